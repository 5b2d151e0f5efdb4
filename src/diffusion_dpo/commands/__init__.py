"""The console commands of `diffusion-dpo`, one module each (`train`, `prepare`, `sample`, `evaluate`, `label`,
`generate_pairs`, `iterate`, `demo`).

Each module exposes `add_arguments(parser)` and `run(args) -> int`; `diffusion_dpo.cli` dispatches to them
from its closed COMMANDS table. A command parses its flags, calls the library and prints; the work itself
lives in the library packages, which know nothing of argparse. Flag groups several commands share live in
`commands.common`. No module here imports `diffusion_dpo.cli` (it loads them, not the other way round).
"""
