"""Make the DrawBench table (metric, model, value, source) of scripts/reproduce_drawbench.sh beside the
published Curriculum-DPO rows (diffusion_dpo.evaluate.drawbench).

    python scripts/drawbench_table.py --family sd --out runs/db hps=runs/db/hps/report/results.json
"""

from __future__ import annotations

import argparse
import sys

from diffusion_dpo.errors import UserError
from diffusion_dpo.evaluate.drawbench import table_rows, to_markdown, write_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=["sd", "lcm"])
    parser.add_argument("--out", required=True, help="folder for drawbench_table.md/.csv/.json")
    parser.add_argument("results", nargs="+", metavar="TASK=RESULTS_JSON",
                        help="task (aesthetics, hps, text_alignment) and its evaluate results.json")
    args = parser.parse_args(argv)
    try:
        pairs = dict(item.split("=", 1) for item in args.results if "=" in item)
        if len(pairs) != len(args.results):
            raise UserError("results must be given as TASK=RESULTS_JSON, e.g. hps=report/results.json")
        rows = table_rows(pairs, args.family)
        paths = write_table(rows, args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(rows), end="")
    print(f"-> {paths['markdown']}, {paths['csv']}, {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
