"""cngmrv.sim"""
