"""Issue 4 through the user's path: `leanq quantize --method gptq --bpw B` against uniform GPTQ settings.

GPTQ with leanq's defaults (act-order, clip search, scale refit, one-pass) for planned and uniform rows
alike; the plan's sensitivities are measured once and cached (--sensitivity-cache), as a user re-planning
would.  Every row is saved, then scored from the saved checkpoint on the core protocol (48 windows).

    LEANQ_DATA=../shared/data python benchmarks/hybrid_user_path.py --out out/hybrid-user [--rows P4.25,U4:g64,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROWS = ["P4.25", "U4:g64", "P3.25", "U3:g64", "P2.5", "U2:g32"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="out/hybrid-user")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--float-dir", help="save the float model here once as a HF folder and quantize from it "
                                        "(skips dequantizing the GGUF for every row)")
    a = ap.parse_args()
    from leanq.api import evaluate, quantize

    src = a.model
    if a.float_dir:
        from leanq.models import save_float_folder

        src = str(save_float_folder(a.model, Path(a.float_dir)))

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    for row in a.rows.split(","):
        if row in results:
            continue
        if row.startswith("P"):
            kw = dict(bpw=float(row[1:]), sensitivity_cache=str(out / "sensitivity.json"))
            cmd = f"leanq quantize {a.model} --method gptq --bpw {row[1:]} --sensitivity-cache sens.json --out {row}"
        else:
            bits, g = row[1:].split(":g")
            kw = dict(bits=int(bits), group_size=int(g))
            cmd = f"leanq quantize {a.model} --method gptq --bits {bits} --group-size {g} --out {row}"
        t0 = time.perf_counter()
        qm = quantize(src, method="gptq", device=a.device, progress=False, **kw)
        wall = time.perf_counter() - t0
        ck = qm.save(out / row.replace(":", "-"), overwrite=True)
        r = evaluate(str(ck), max_windows=48, device=a.device, progress=False)
        results[row] = dict(ppl=r.ppl, bits_per_weight=r.bits_per_weight, bytes_on_disk=r.bytes_on_disk,
                            quant_seconds=qm.seconds, wall_seconds=wall, command=cmd + f"; leanq eval {row} --max-windows 48",
                            plan_bpw=None if qm.plan is None else qm.plan.bpw)
        print(row, json.dumps(results[row]), flush=True)
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(res_path)


if __name__ == "__main__":
    main()
