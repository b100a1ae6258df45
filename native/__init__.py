"""cngmrv.native"""
