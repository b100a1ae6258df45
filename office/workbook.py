"""The monitoring-report workbook: ``cngmrv report --format xlsx`` (openpyxl).

Sheets:

- **Parameters**: every fixed parameter (value in use, unit, JCM monitoring
  option A/B/C, source, description, range) and every monitored parameter per
  bus (method, frequency, equipment, accuracy, last calibration from the
  methodology's ``[monitored]`` tables, and the batch range and hashes it came
  from).  Switches (CH4/N2O, boundary terms) are 1/0 cells and the form is a
  text cell, so a verifier can change them too.
- **Calculation**: one row per bus and diesel blend within the period, then a
  total row per bus and one for the fleet.  Monitored sums are values; every
  energy, emission factor, RE, PE and ER is a live formula over the Parameters
  sheet, so changing a parameter recomputes them.
- **Ex-ante vs ex-post**: the plan's per-bus-day estimates (``[ex_ante]``)
  scaled to the monitored bus-days, against the monitored values (ER linked to
  the Calculation sheet).
- **Sensitivity**: fleet ER with each ranged parameter at its ends (values).

Only arithmetic, comparisons and ``IF``, ``MIN``, ``MAX``, ``SUM`` are used, so
any spreadsheet program (and the test's own evaluator) computes the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cngmrv.office.report import Report, ReportError

PARAM_SHEET = "Parameters"
CALC_SHEET = "Calculation"
PARAM_HEAD = (
    "name", "description", "value", "unit", "monitoring option", "source", "method",
    "frequency", "equipment id", "accuracy", "last calibration", "low", "high",
    "batch range", "batch set sha256",
)  # fmt: skip
CALC_HEAD = (
    "device_id", "row", "FAME share (vol)", "diesel L", "gas kg metered", "credited km",
    "gas factor low", "gas factor high", "SFC_ref L/km", "ref FAME share", "CH4 slip kg/TJ",
    "fossil MJ/L", "FAME MJ/L", "fossil kg/MJ", "FAME kg/MJ", "blend kg/L", "blend kg/MJ",
    "gas kg/MJ", "boundary kg/kg gas", "ER slope per gas factor", "gas factor used",
    "gas kg credited", "RE_A kg", "RE_B kg", "PE_A kg", "PE_B kg", "RE kg", "PE kg", "ER kg",
)  # fmt: skip


def _col(name: str) -> str:
    from openpyxl.utils import get_column_letter

    return get_column_letter(CALC_HEAD.index(name) + 1)


def write(report: Report, path: Path) -> None:
    try:
        from openpyxl import Workbook
    except ImportError:
        raise ReportError(
            "the workbook needs the office install: pip install 'cngmrv[office]'"
        ) from None
    d = report.data
    wb = Workbook()
    ws = wb.active
    assert ws is not None
    ws.title = PARAM_SHEET
    cells = _parameters(ws, d)
    calc = wb.create_sheet(CALC_SHEET)
    fleet_er = _calculation(calc, d, cells)
    _ex_ante(wb.create_sheet("Ex-ante vs ex-post"), d, fleet_er)
    _sensitivity(wb.create_sheet("Sensitivity"), d)
    wb.save(path)


def _parameters(ws: Any, d: Mapping[str, Any]) -> dict[str, str]:
    """Write the parameter sheet; name -> absolute reference of its value cell."""
    m = d["methodology"]
    ws.append(PARAM_HEAD)
    refs: dict[str, str] = {}

    def row(name: str, value: Any, **kw: Any) -> None:
        ws.append([
            name, kw.get("description", ""), value, kw.get("unit", ""), kw.get("option", ""),
            kw.get("source", ""), kw.get("method", ""), kw.get("frequency", ""),
            kw.get("equipment", ""), kw.get("accuracy", ""), kw.get("last_calibration", ""),
            kw.get("low"), kw.get("high"), kw.get("batches", ""), kw.get("set_sha256", ""),
        ])  # fmt: skip
        refs[name] = f"{PARAM_SHEET}!$C${ws.max_row}"

    files = "; ".join(f"{f['name']} sha256 {f['sha256']}" for f in m["files"])
    row("form", m["form"], description="A, B or both", source=files, option="A")
    row(
        "include_ch4_n2o", int(m["include_ch4_n2o"]), unit="1/0",
        description=f"CH4 and N2O in the emission factors (GWP set {m['gwp_set']})",
        source=files,
    )  # fmt: skip
    for key, what in (
        ("include_compression", "station compression electricity in PE"),
        ("include_upstream_leakage", "upstream methane leakage in PE"),
    ):
        row(key, int(m["boundary"][key]), unit="1/0", description=what, source=files)
    for name, p in m["parameters"].items():
        row(
            name, p["value"], unit=p["unit"], option=p["option"], source=p["source"],
            description=p.get("description", ""), low=p.get("low"), high=p.get("high"),
            method="fixed ex ante (methodology file)", frequency="once per methodology version",
        )  # fmt: skip
    for b in m["blend"]:
        row(
            f"blend {b['name']}", b["fame_share_vol"], unit="fraction (vol)", option="A",
            source=b["source"], description=f"FAME share from {b['from']} to {b['to'] or 'open'}",
        )  # fmt: skip
    info = m.get("monitored", {})
    for bus in d["buses"]:
        dev = bus["device_id"]
        trace = bus["batches"]
        span = f"{trace.get('first_seq', '')}..{trace.get('last_seq', '')}" if trace else ""
        if bus.get("sfc_ref_l_per_km") is not None:
            own = m["bus_reference"].get(dev)
            src = own or m["reference_consumption"].get(bus["class"] or "", {})
            row(
                f"sfc_ref {dev}", bus["sfc_ref_l_per_km"], unit="L/km",
                option=src.get("option", "A"), source=src.get("source", ""),
                description="form B reference diesel consumption "
                + ("(the bus's own baseline)" if own else f"(class {bus['class']})"),
            )  # fmt: skip
            if own and own.get("fame_share_vol") is not None:
                row(f"sfc_ref_fame {dev}", own["fame_share_vol"], unit="fraction (vol)",
                    source=own["source"], description="FAME share of the reference's litres")  # fmt: skip
        engine = m["bus_engine"].get(dev)
        if engine is not None:
            p = m["engine_slip"][engine]
            row(f"ef_ch4_gas {dev}", p["value"], unit=p["unit"], option=p["option"],
                source=p["source"], description=f"measured methane slip, engine {engine}")  # fmt: skip
        own = m.get("monitored_bus", {}).get(dev, {})
        for q in ("gas_kg", "diesel_l", "distance_km"):
            meta = {**info.get(q, {}), **own.get(q, {})}
            row(
                f"{q} {dev}", bus[q], unit=meta.get("unit", q.rsplit("_", 1)[-1]),
                option=meta.get("option", "C"), source=meta.get("source", "signed readings"),
                description=meta.get("description", q), method=meta.get("method", ""),
                frequency=meta.get("frequency", ""), equipment=meta.get("equipment", ""),
                accuracy=meta.get("accuracy", ""),
                last_calibration=meta.get("last_calibration", ""), batches=span,
                set_sha256=trace.get("set_sha256", ""),
            )  # fmt: skip
    return refs


def _calculation(ws: Any, d: Mapping[str, Any], p: Mapping[str, str]) -> str:
    """Write the calculation sheet; the reference of the fleet ER cell."""
    ws.append(CALC_HEAD)
    c = {name: _col(name) for name in CALC_HEAD}
    totals: list[int] = []
    for bus in d["buses"]:
        dev = bus["device_id"]
        first = ws.max_row + 1
        parts = bus["blend_parts"]
        total_row = first + len(parts)
        sfc = p.get(f"sfc_ref {dev}")
        ref_fame = p.get(f"sfc_ref_fame {dev}")
        slip = p.get(f"ef_ch4_gas {dev}", p["ef_ch4_gas"])
        for i, part in enumerate(parts):
            r = first + i

            def f(name: str, r: int = r) -> str:
                return f"{c[name]}{r}"

            ws.append([
                dev, f"blend {part['fame_share_vol']:g}", part["fame_share_vol"],
                part["diesel_l"], part["gas_kg"], part["distance_credited_km"],
                bus["gas_factor_low"], bus["gas_factor_high"],
                f"={sfc}" if sfc else 0,
                f"={ref_fame}" if ref_fame else f"={f('FAME share (vol)')}",
                f"={slip}",
                f"=(1-{f('FAME share (vol)')})*{p['density_diesel']}*{p['ncv_diesel']}",
                f"={f('FAME share (vol)')}*{p['density_fame']}*{p['ncv_fame']}",
                f"=({p['ef_co2_diesel']}+{p['include_ch4_n2o']}*({p['ef_ch4_diesel']}*{p['gwp_ch4']}"
                f"+{p['ef_n2o_diesel']}*{p['gwp_n2o']}))/1000000",
                f"=({p['ef_co2_fame']}*{p['biogenic_co2_counted']}+{p['include_ch4_n2o']}*("
                f"{p['ef_ch4_fame']}*{p['gwp_ch4']}+{p['ef_n2o_fame']}*{p['gwp_n2o']}))/1000000",
                f"={f('fossil MJ/L')}*{f('fossil kg/MJ')}+{f('FAME MJ/L')}*{f('FAME kg/MJ')}",
                f"={f('blend kg/L')}/({f('fossil MJ/L')}+{f('FAME MJ/L')})",
                f"=({p['ef_co2_gas']}+{p['include_ch4_n2o']}*({f('CH4 slip kg/TJ')}*{p['gwp_ch4']}"
                f"+{p['ef_n2o_gas']}*{p['gwp_n2o']}))/1000000",
                f"={p['include_compression']}*{p['compression_kwh_per_kg']}*{p['grid_ef']}"
                f"+{p['include_upstream_leakage']}*{p['upstream_ch4_gas']}*{p['ncv_gas']}"
                f"/1000000*{p['gwp_ch4']}",
                # d(ER_A)/d(gas factor): positive while a kg of gas lowers emissions.
                f"={f('gas kg metered')}*({p['ncv_gas']}*{f('blend kg/MJ')}"
                f"-{p['ncv_gas']}*{f('gas kg/MJ')}-{f('boundary kg/kg gas')})",
                f"=IF({c['ER slope per gas factor']}{total_row}>=0,{f('gas factor low')},"
                f"{f('gas factor high')})",
                f"={f('gas kg metered')}*{f('gas factor used')}",
                f"=({f('diesel L')}*({f('fossil MJ/L')}+{f('FAME MJ/L')})+{f('gas kg credited')}"
                f"*{p['ncv_gas']})*{f('blend kg/MJ')}",
                f"={f('credited km')}*{f('SFC_ref L/km')}*((1-{f('ref FAME share')})"
                f"*{p['density_diesel']}*{p['ncv_diesel']}+{f('ref FAME share')}"
                f"*{p['density_fame']}*{p['ncv_fame']})*{f('blend kg/MJ')}",
                f"={f('diesel L')}*{f('blend kg/L')}+{f('gas kg credited')}*({p['ncv_gas']}"
                f"*{f('gas kg/MJ')}+{f('boundary kg/kg gas')})",
                f"={f('diesel L')}*{f('blend kg/L')}+{f('gas kg metered')}*{f('gas factor high')}"
                f"*({p['ncv_gas']}*{f('gas kg/MJ')}+{f('boundary kg/kg gas')})",
            ])  # fmt: skip
        last = total_row - 1

        def s(name: str, first: int = first, last: int = last) -> str:
            return f"SUM({c[name]}{first}:{c[name]}{last})"

        form = p["form"]
        re_a, re_b, pe_a, pe_b = s("RE_A kg"), s("RE_B kg"), s("PE_A kg"), s("PE_B kg")
        tr = total_row
        ws.append([
            dev, "total", None, f"={s('diesel L')}", f"={s('gas kg metered')}",
            f"={s('credited km')}", None, None, None, None, None, None, None, None, None, None,
            None, None, None, f"={s('ER slope per gas factor')}", None,
            f"={s('gas kg credited')}", f"={re_a}", f"={re_b}", f"={pe_a}", f"={pe_b}",
            f'=IF({form}="A",{c["RE_A kg"]}{tr},IF({form}="B",{c["RE_B kg"]}{tr},'
            f'MIN({c["RE_A kg"]}{tr},{c["RE_B kg"]}{tr})))',
            f'=IF({form}="A",{c["PE_A kg"]}{tr},IF({form}="B",{c["PE_B kg"]}{tr},'
            f'MAX({c["PE_A kg"]}{tr},{c["PE_B kg"]}{tr})))',
            f"={c['RE kg']}{tr}-{c['PE kg']}{tr}",
        ])  # fmt: skip
        totals.append(tr)
    fr = ws.max_row + 1

    def fleet(name: str) -> str:
        return "=" + "+".join(f"{c[name]}{t}" for t in totals) if totals else "=0"

    row: list[str | None] = [None] * len(CALC_HEAD)
    row[0], row[1] = "*", "fleet"
    for name in ("diesel L", "gas kg metered", "gas kg credited", "RE kg", "PE kg", "ER kg"):
        row[CALC_HEAD.index(name)] = fleet(name)
    ws.append(row)
    return f"'{CALC_SHEET}'!${c['ER kg']}${fr}"


def _ex_ante(ws: Any, d: Mapping[str, Any], fleet_er: str) -> None:
    ex = d["methodology"]["ex_ante"]
    per = ex.get("per_bus_day", {})
    bus_days = sum(len(b["days"]) for b in d["buses"])
    ws.append(["quantity", "ex ante per bus-day", "bus-days monitored", "ex ante", "ex post",
               "ex post / ex ante", "source"])  # fmt: skip
    ws.append(["bus-days", None, bus_days, None, None, None, "UTC days with readings"])
    if not per:
        ws.append(["no ex-ante estimates configured ([ex_ante] in the methodology file)"])
        return
    post = {
        "gas_kg": d["gas_kg"], "diesel_l": d["diesel_l"], "distance_km": d["distance_km"],
        "er_kg_co2": f"={fleet_er}",
    }  # fmt: skip
    for k, v in per.items():
        r = ws.max_row + 1
        ws.append([k, v, "=C2", f"=B{r}*C{r}", post[k], f"=IF(D{r}=0,0,E{r}/D{r})", ex["source"]])


def _sensitivity(ws: Any, d: Mapping[str, Any]) -> None:
    s = d["sensitivity"]
    ws.append(["fleet ER, central parameters (kg CO2e)", s["er_kg_co2_central"]])
    ws.append(["fleet ER, conservative set (kg CO2e)", s["er_kg_co2_conservative"]])
    ws.append([])
    ws.append(["parameter", "unit", "value", "low", "high", "ER at low", "ER at high", "swing"])
    for r in s["parameters"]:
        ws.append([r["parameter"], r["unit"], r["value"], r["low"], r["high"],
                   r["er_kg_co2_at_low"], r["er_kg_co2_at_high"], r["swing_kg_co2"]])  # fmt: skip
