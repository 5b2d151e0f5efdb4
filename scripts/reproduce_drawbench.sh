#!/usr/bin/env bash
# Curriculum-DPO's DrawBench rows end to end (docs/curriculum.md, "Reproducing the DrawBench table"):
#   generate-pairs (K images per prompt, the task's reward, --strategy all-ranked, the task's threshold)
#   -> train DPO and Curriculum-DPO from the same pairs (configs/drawbench_<sd15|lcm>_dpo_<task>.yaml)
#   -> sample DrawBench for base, DPO, Curriculum-DPO (preset drawbench-sd / drawbench-lcm, 10 images per prompt)
#   -> score with the task's metric -> ONE table (metric, model, value, source) beside the published rows.
#
#   scripts/reproduce_drawbench.sh --family sd --task all --out runs/drawbench_sd
#   scripts/reproduce_drawbench.sh --family lcm --task hps --out runs/drawbench_lcm --device cuda
#
# Every step is resumable: rerun the same command after an interruption (generate-pairs skips finished chunks,
# train resumes from its latest checkpoint, sampling generates only missing images).
# Environment: DIFFUSION_DPO (the command, default `diffusion-dpo`), PYTHON (default `python`).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: reproduce_drawbench.sh [--family sd|lcm] [--task aesthetics|hps|text_alignment|all] [--out DIR]
         [--base MODEL] [--teacher MODEL] [--prompts drawbench|FILE] [--limit N]
         [--pair-images K] [--eval-images N] [--reward SPEC] [--metric SPEC] [--margin M]
         [--device DEV] [--dtype float16] [--train-override KEY=VALUE ...] [--tiny]
  --family        sd (SD 1.5, DPO) or lcm (Dreamshaper-v7 LCM, Consistency-DPO); default sd
  --task          aesthetics, hps, text_alignment or all (one table over the tasks); default all
  --out           output folder (default runs/drawbench_<family>)
  --base          pipeline to tune (default stable-diffusion-v1-5/stable-diffusion-v1-5 or SimianLuo/LCM_Dreamshaper_v7)
  --teacher       lcm only: the teacher pipeline (default Lykon/dreamshaper-7)
  --prompts       prompt set for pairs and evaluation (default drawbench: the same 200 prompts, as the paper)
  --pair-images   K images per prompt for the training pairs (default 50; the code uses 500 or 50)
  --eval-images   images per prompt for the table (default 10)
  --reward        reward that ranks the K images (default: the task's: aesthetic, hpsv21, text_alignment)
  --metric        metric of the table (default: the task's reward); module:function for your own
  --margin        pair threshold (default: the task's, 0.2 aesthetics, 0.02 hps / text_alignment)
  --train-override  extra `section.key=value` for both trainings (repeatable)
  --tiny          test sizes: 32 px, 2 sampling steps, 4 training steps, 2 curriculum levels of 2 steps
  --dry-run       print the commands instead of running them
EOF
}

family=sd task=all out="" base="" teacher="" prompts=drawbench limit="" pair_images=50 eval_images=10
reward="" metric="" margin="" device="" dtype="" tiny=0 dry=0
overrides=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --family) family="$2"; shift 2 ;;
        --task) task="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --base) base="$2"; shift 2 ;;
        --teacher) teacher="$2"; shift 2 ;;
        --prompts) prompts="$2"; shift 2 ;;
        --limit) limit="$2"; shift 2 ;;
        --pair-images) pair_images="$2"; shift 2 ;;
        --eval-images) eval_images="$2"; shift 2 ;;
        --reward) reward="$2"; shift 2 ;;
        --metric) metric="$2"; shift 2 ;;
        --margin) margin="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --dtype) dtype="$2"; shift 2 ;;
        --train-override) overrides+=("$2"); shift 2 ;;
        --tiny) tiny=1; shift ;;
        --dry-run) dry=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
configs="$(cd "$here/.." && pwd)/configs"
read -r -a ddpo <<< "${DIFFUSION_DPO:-diffusion-dpo}"
read -r -a python <<< "${PYTHON:-python}"

case "$family" in
    sd) base="${base:-stable-diffusion-v1-5/stable-diffusion-v1-5}"; config_family=sd15; preset=drawbench-sd ;;
    lcm) base="${base:-SimianLuo/LCM_Dreamshaper_v7}"; teacher="${teacher:-Lykon/dreamshaper-7}"
         config_family=lcm; preset=drawbench-lcm; overrides=("model.teacher=$teacher" ${overrides[@]+"${overrides[@]}"}) ;;
    *) echo "error: --family $family: choose sd or lcm" >&2; exit 2 ;;
esac
case "$task" in
    all) tasks=(aesthetics hps text_alignment) ;;
    aesthetics|hps|text_alignment) tasks=("$task") ;;
    *) echo "error: --task $task: choose aesthetics, hps, text_alignment or all" >&2; exit 2 ;;
esac
out="${out:-runs/drawbench_$family}"

# Flags every sampling command shares (pairs and evaluation use the same preset, as the code)
sampling=(--prompts "$prompts" --preset "$preset")
[[ -n "$limit" ]] && sampling+=(--limit "$limit")
[[ -n "$dtype" ]] && sampling+=(--dtype "$dtype")
run_flags=()
[[ -n "$device" ]] && run_flags+=(--device "$device")
if [[ $tiny == 1 ]]; then
    # tiny in-process test models: 32 px images, 2 sampler steps; training sized to finish in seconds on a CPU
    sampling+=(--resolution 32 --steps 2)
    overrides=(data.resolution=32 train.max_steps=4 train.batch_size=1 train.checkpoint_every=0 lora.rank=4 lora.alpha=4
               'train.mixed_precision="no"' model.frozen_dtype=float32 train.gradient_checkpointing=false
               train.curriculum.levels=2 train.curriculum.steps_per_level=2 output.report_to=none ${overrides[@]+"${overrides[@]}"})
fi

# run CMD...: run it, or with --dry-run print it (shell-quoted, one line)
run() {
    if [[ $dry == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

results=()
for t in "${tasks[@]}"; do
    case "$t" in
        aesthetics) task_reward=aesthetic; task_margin=0.2 ;;
        hps) task_reward=hpsv21; task_margin=0.02 ;;
        text_alignment) task_reward=text_alignment; task_margin=0.02 ;;
    esac
    r="${reward:-$task_reward}" m="${metric:-${reward:-$task_reward}}" g="${margin:-$task_margin}"
    dir="$out/$t"
    echo "== $t: pairs ($pair_images images per prompt, reward $r, margin $g)"
    run "${ddpo[@]}" generate-pairs --base "$base" "${sampling[@]}" -k "$pair_images" --reward "$r" \
        --strategy all-ranked --margin "$g" --out "$dir/pairs" --no-progress ${run_flags[@]+"${run_flags[@]}"}
    config="$configs/drawbench_${config_family}_dpo_${t}.yaml"
    common=(--config "$config" "model.pretrained=$base" "data.source=$dir/pairs/pairs.jsonl" ${overrides[@]+"${overrides[@]}"})
    echo "== $t: train DPO"
    run "${ddpo[@]}" train "${common[@]}" "output.dir=$dir/dpo"
    echo "== $t: train Curriculum-DPO"
    run "${ddpo[@]}" train "${common[@]}" train.curriculum.enabled=true "output.dir=$dir/cdpo"
    echo "== $t: sample base, dpo, cdpo ($eval_images images per prompt) and score with $m"
    run "${ddpo[@]}" evaluate --base "$base" --tuned "dpo=$dir/dpo" --tuned "cdpo=$dir/cdpo" "${sampling[@]}" \
        --images-per-prompt "$eval_images" --metrics "$m" --samples "$dir/samples" --out "$dir/report" \
        --quiet ${run_flags[@]+"${run_flags[@]}"}
    results+=("$t=$dir/report/results.json")
done

run "${python[@]}" "$here/drawbench_table.py" --family "$family" --out "$out" "${results[@]}"
