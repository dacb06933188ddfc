"""edge-inspect plant side: reject gates, reject timing, the MQTT link.

Imports nothing of ours (see DESIGN.md), so a PLC integrator can reuse it alone.
"""
