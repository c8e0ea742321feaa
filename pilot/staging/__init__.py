"""Data staging: moving a job's inputs in and its outputs and log out.

``storage`` describes the storage endpoints, ``plan`` turns a job plus the queue's
configuration into transfers with ordered candidate URLs, ``engine`` runs them with
copytools (``tools/``), checksums, time-outs, progress and a durable record.
"""
