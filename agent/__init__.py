"""cngmrv.agent"""
