def main() -> None:
    from cngmrv.native._integrator import lib
    print(lib.add(1, 2))
