"""One module per console command (run, demo, bench, deploy-model, check-config, ...) and the CLI.

The composition root lives here (daemon.Agent): it wires runtime and report together.
"""
