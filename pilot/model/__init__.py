"""The bottom layer: what a job is (validated), its files and processes, server states, credentials.

Nothing here knows Twisted services, processes or the network; everything above may use it.
"""
