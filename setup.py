"""Packaging for cngmrv.

The folders at the repository root (``agent``, ``drivers``, ``native``,
``signed``, ``office``, ``sim``) install as subpackages of one implicit
namespace package ``cngmrv``, so no generic top-level names land in
site-packages.

Two installs from one distribution: ``pip install cngmrv`` is the bus's
(what the agent runs on, nothing more); ``pip install 'cngmrv[office]'`` adds
what the office's ingest server and reports need (docs/deploy-pi.md,
docs/mrv-methodology.md); ``pip install 'cngmrv[pkcs11]'`` adds the signer for a
key held in a TPM or secure element (docs/deploy-pi.md); ``pip install 'cngmrv[mqtt]'``
uploads over MQTT (docs/upload-transports.md).  The C integrator is built by
cffi in API (out-of-line) mode through ``cffi_modules``.
"""

from setuptools import setup

SUBPACKAGES = ("agent", "drivers", "native", "signed", "office", "sim")

setup(
    name="cngmrv",
    version="0.1.0",
    description="Edge agent: signed, verifiable fuel and emission data from dual-fuel (diesel-CNG) buses",
    python_requires=">=3.11",
    packages=[f"cngmrv.{name}" for name in SUBPACKAGES],
    package_dir={f"cngmrv.{name}": name for name in SUBPACKAGES},
    package_data={
        "cngmrv.native": ["*.h", "*.c"],
        "cngmrv.drivers": ["*.dbc"],
        # The shipped MRV methodology files, read by `cngmrv report`.
        "cngmrv.office": ["methodology/*.toml"],
    },
    setup_requires=["cffi>=1.16"],
    cffi_modules=["native/build_integrator.py:ffibuilder"],
    install_requires=[
        "python-can>=4.4",
        "pyserial>=3.5",
        "cffi>=1.16",
        "msgpack>=1.0.7",
        "cryptography>=43",
        "cantools>=39.4",
    ],
    extras_require={
        # The office: never installed in a bus.
        "office": [
            # The HTML report's plots (Agg backend, no display needed).
            "matplotlib>=3.8",
            # The fleet ER of the conservative set and the sensitivity, every bus at once
            # (mrv.FleetColumns); matplotlib needs it anyway.
            "numpy>=1.26",
            # The monitoring-report workbook (cngmrv report --format xlsx).
            "openpyxl>=3.1",
            # cngmrv sfc-ref writes into a project's methodology file, keeping its comments.
            "tomlkit>=0.12",
            # The ingest's production server (ASGI, worker processes) and its
            # metrics, summed over the workers (docs/office.md).
            "uvicorn>=0.30",
            # uvicorn's event loop when installed (loop="auto"): a libuv loop, less CPU
            # per request than asyncio's own.
            "uvloop>=0.19; sys_platform != 'win32'",
            "prometheus-client>=0.20",
            # The fleet database on PostgreSQL (docs/fleet-database.md): psycopg 3 and its pool.
            "psycopg[binary]>=3.1",
            "psycopg-pool>=3.2",
        ],
        # A bus whose key lives in a TPM or secure element (signed/hsm.py).  An extra,
        # not install_requires: a compiled module (Cython, about 8 MB installed)
        # that a bus signing with its key file never loads.
        "pkcs11": ["python-pkcs11>=0.10"],
        # Uploads over MQTT (agent/mqtt_transport.py, docs/upload-transports.md): a bus
        # that uploads over HTTP never installs it.
        "mqtt": ["paho-mqtt>=2.0"],
        "test": [
            "cngmrv[office,pkcs11,mqtt]",
            "pytest>=8",
            "hypothesis>=6.100",
            "mypy>=1.10",
            "ruff>=0.5",
            "numpy>=1.26",
            # Reads the shared real MF4 recording through can.LogReader.
            "asammdf>=7.4",
            # The kit codec is type-checked against MicroPython's stdlib (typeshed
            # layout) and a board's stubs: `make lint`, mypy-micropython.ini.
            "micropython-stdlib-stubs~=1.29.0",
            "micropython-rp2-stubs~=1.29.0",
        ],
    },
    entry_points={
        "console_scripts": ["cngmrv = cngmrv.agent.cli:main"],
        # Subcommands contributed by other packages, so the agent never imports the simulator.
        "cngmrv.commands": [
            "sim = cngmrv.sim.sim_cli:register",
            "ingest = cngmrv.office.office_cli:register_ingest",
            "report = cngmrv.office.office_cli:register_report",
        ],
        # Sources of samples and events (agent/source.py); the name is the config section.
        "cngmrv.sources": [
            "can = cngmrv.agent.builtin_sources:CanBus",
            "kit = cngmrv.agent.builtin_sources:Kit",
            "obd = cngmrv.agent.obd:ObdSource",
            "gps = cngmrv.agent.gps_source:Gps",
        ],
        # Upload transports, one per URL scheme (agent/transport.py): the core keeps retry,
        # backoff and the acknowledgement rule; a transport only carries one batch.
        "cngmrv.transports": [
            "http = cngmrv.agent.http_transport:HttpTransport",
            "https = cngmrv.agent.http_transport:HttpTransport",
            "mqtt = cngmrv.agent.mqtt_transport:MqttTransport",
            "mqtts = cngmrv.agent.mqtt_transport:MqttTransport",
        ],
    },
)
