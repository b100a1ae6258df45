"""cngmrv.drivers"""
