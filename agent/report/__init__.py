"""The sinks: MQTT reporter, Prometheus, image recorder, systemd notify, kick tracking, the web page.

May import agent.runtime and the contract, never agent.commands.
"""
