"""cngmrv.signed: what the bus and the office both rely on.

The batch format (envelope, header, payload, chain and audit rules) and the
device keys.  The bus's agent writes batches with it, the office's ingest and
reports read them with it, and ``cngmrv verify`` checks them with it; none of
them keeps a second copy of these rules.  Nothing here imports the agent or
the office.
"""
