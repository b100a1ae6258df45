"""cngmrv.office: what runs at the fleet operator or the auditor, never in the bus.

The ingest server, the fleet database, the MRV methodology and the emission
reports.  Installed with the ``office`` extra (``pip install 'cngmrv[office]'``);
the bus's agent never imports it.  It reads batches through
:mod:`cngmrv.signed`, never through the bus's runtime.
"""
