"""The data path: sources, part selection, the pipeline stages, the inspector and its engines.

Imports only the contract at agent/'s top (bundle, preprocess, decide, types, config), never
agent.report or agent.commands.
"""
