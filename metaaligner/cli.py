"""`metaaligner` command line: thin subcommands over the library, all driven by the shared config."""

from __future__ import annotations

import argparse
import os
import sys

from metaaligner.config import load_config


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (shared schema); flags override its values")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")


def _add_allow_empty(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-empty", action="store_const", const=True,
                   help="commit even when no rows were read or none came out (else the run fails, output untouched)")


def _section(args, section: str, flags: tuple[str, ...], hint: str):
    """Load --config, let the given flags override `section.<flag>`, and return (config, section)."""
    overrides = {"storage.endpoint_url": args.endpoint_url, **{f"{section}.{f}": getattr(args, f) for f in flags}}
    cfg = load_config(args.config, overrides)
    if getattr(cfg, section) is None:
        raise SystemExit(f"{section}: {hint}")
    return cfg, getattr(cfg, section)


def _holdout(args) -> dict | None:
    """`--holdout-last-n N` or `--holdout-questions PATH [--holdout-column COL]` as a `holdout` section."""
    if args.holdout_last_n is not None and args.holdout_questions is not None:
        raise SystemExit("reformulate: give --holdout-last-n or --holdout-questions, not both")
    if args.holdout_last_n is not None:
        return {"kind": "last_n", "n": args.holdout_last_n}
    if args.holdout_questions is not None:
        return {"kind": "questions_from", "path": args.holdout_questions,
                **({"column": args.holdout_column} if args.holdout_column else {})}
    if args.holdout_column:
        raise SystemExit("reformulate: --holdout-column goes with --holdout-questions")
    return None


def _reformulate(args) -> int:
    from metaaligner.data.reformulate.job import run_reformulation

    args.holdout = _holdout(args)
    cfg, rf = _section(args, "reformulate", ("input", "output", "format", "objectives", "template", "seed",
                                             "score_decimals", "holdout", "holdout_fraction", "split_seed",
                                             "max_bad_fraction", "on_bad_file", "max_row_bytes", "allow_empty"),
                       "give --input and --output (or a config with a reformulate section)")
    summary = run_reformulation(rf, cfg.storage)
    held_out = (f", {summary['holdout_pairs']} held out ({summary['holdout']['kind']}) as {summary['test_rows']} test "
                f"rows, {summary['training_items_sharing_heldout_question']} training items share a held-out "
                f"question" if summary["holdout"] else "")
    print(f"reformulated {summary['valid_pairs']} pairs into {summary['items_total']} items{held_out} "
          f"({summary['quarantined']} quarantined, {len(summary['bad_files'])} unreadable files) in "
          f"{summary['wall_time_s']:.1f}s -> {rf.output}")
    return 0


def _score_decimals(value: str) -> int | str:
    if value in ("exact", "auto"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, 'exact' or 'auto', got {value!r}") from None


def _reward_models(args) -> list[dict] | None:
    """`--reward-model NAME=PATH` flags, in order; a config entry of the same name keeps its other settings."""
    if not args.reward_model:
        return None
    from metaaligner.config import read_yaml

    configured = (read_yaml(args.config).get("score") or {}).get("reward_models") or [] if args.config else []
    by_name = {m.get("name"): m for m in configured if isinstance(m, dict)}
    models = []
    for flag in args.reward_model:
        name, sep, path = flag.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"score: --reward-model takes NAME=PATH, got {flag!r}")
        models.append({**by_name.get(name, {}), "name": name, "path": path})
    return models


def _score(args) -> int:
    from metaaligner.data.scoring.job import run_scoring

    args.reward_models = _reward_models(args)
    cfg, sc = _section(args, "score", ("input", "output", "format", "reward_models", "split", "length_of",
                                       "min_tokens", "decimals", "batch_size", "micro_batch_size", "concurrency",
                                       "num_cpus", "num_gpus", "device", "dtype", "max_bad_fraction", "allow_empty"),
                       "give --input, --output and --reward-model NAME=PATH (or a config with a score section)")
    s = run_scoring(sc, cfg.storage)
    print(f"scored {s['rows_scored']}/{s['rows_read']} rows ({s['rows_quarantined']} quarantined) with "
          f"{', '.join(s['objectives'])} in {s['wall_time_s']:.1f}s -> {sc.output}")
    return 0


def _evaluate(args) -> int:
    from metaaligner.evaluation.config import JudgeConfig
    from metaaligner.evaluation.job import run_evaluation

    cfg, ev = _section(args, "evaluate", ("input", "output", "seed", "question_column", "id_column", "golden",
                                          "candidates", "max_invalid_fraction", "max_bad_fraction",
                                          "allow_empty"),
                       "give --config with an evaluate section (or --input and --output)")
    judge = {k: v for k, v in (("url", args.judge_url), ("model", args.judge_model), ("prompt", args.judge_prompt),
                               ("sampling", args.judge_sampling)) if v is not None}
    if judge:
        configured = ev.judge.model_dump(exclude_unset=True)
        if "sampling" in judge:  # the flag replaces the config's sampling, in either form
            configured = {k: v for k, v in configured.items() if k not in ("temperature", "max_tokens")}
        ev = ev.model_copy(update={"judge": JudgeConfig.model_validate({**configured, **judge})})
    summary = run_evaluation(ev, cfg.storage)
    print("\n".join(["wrote:", *summary["outputs"]]))
    return 0


def _serve(args) -> int:
    from metaaligner.serving.app import serve_forever

    cfg, sv = _section(args, "serve", ("host", "port"), "give --config with a serve section (see jobs/configs/serve-tiny.yaml)")
    if args.create_tiny_model:
        from metaaligner.serving.tiny import ensure_tiny_model

        ensure_tiny_model(sv.corrector.model)
    serve_forever(sv, cfg.storage)
    return 0


def _correct(args) -> int:
    from metaaligner.serving.batch import run_correction

    cfg, cc = _section(args, "correct", ("input", "output", "model", "adapter", "template", "objectives", "default_objectives",
                                         "concurrency", "batch_size", "num_gpus", "question_column",
                                         "answer_column", "id_column", "on_too_long", "max_bad_fraction",
                                         "allow_empty"),
                       "give --input, --output and --model (or a config with a correct section)")
    s = run_correction(cc, cfg.storage)
    print(f"corrected {s['corrected']}/{s['rows']} rows ({s['errors']} errors, {s['too_long']} too long: "
          f"on_too_long={s['on_too_long']}) in {s['wall_time_s']:.1f}s, "
          f"{s['generated_tokens_per_s']:.0f} generated tok/s -> {cc.output}")
    return 0


def _train(args) -> int:
    from metaaligner.training.trainer import run_training

    cfg, tr = _section(args, "train", ("data", "base_model", "output"), "the config needs a train section")
    summaries = run_training(tr, cfg.storage, args.stage)
    for name, s in summaries.items():
        print(f"{name}: {s['steps']} steps, loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}, "
              f"{s['dropped']} rows dropped, exported {', '.join(filter(None, (s.get('adapter'), s['export'])))}")
    return 0


def _pipeline(args) -> int:
    from metaaligner.pipeline import STEPS, run_pipeline

    cfg = load_config(args.config, {"storage.endpoint_url": args.endpoint_url})
    results = run_pipeline(cfg, tuple(args.steps or STEPS), summary_uri=args.summary)
    print(f"pipeline finished in {results['wall_time_s']:.1f}s: {', '.join(k for k in results if k in STEPS)}")
    return 0


def _demo(args) -> int:
    from metaaligner.demo import DemoConfig, run_demo

    run_demo(DemoConfig(output=args.output, quick=args.quick, base_model=args.base_model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaaligner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reformulate", help="preference pairs -> contrastive/equal correction items (Ray Data)")
    _add_config(p)
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--format", choices=["canonical", "ultrafeedback", "hh_rlhf_scores", "fastchat"])
    p.add_argument("--objectives", help="hh_rlhf | ultrafeedback | imhi | PATH.yaml")
    p.add_argument("--template", choices=["paper", "hh_rlhf", "ultrafeedback", "imhi"])
    p.add_argument("--seed", type=int)
    p.add_argument("--score-decimals", type=_score_decimals, metavar="N|exact|auto",
                   help="scores tie when equal after rounding to N decimals, or exactly (auto: exact for "
                        "hh_rlhf_scores, 1 for canonical)")
    p.add_argument("--holdout-fraction", type=float, help="share of questions held out as evaluation rows in test/ "
                   "(hash split)")
    p.add_argument("--split-seed", type=int, help="seed of the held-out split's hash")
    p.add_argument("--holdout-last-n", type=int, metavar="N", help="hold out the last N distinct questions in input "
                   "order (files sorted, then rows), as the reference's train[-15000:]")
    p.add_argument("--holdout-questions", metavar="PATH", help="hold out every question found in a column of these "
                   "CSV/JSON/Parquet file(s), e.g. the released policy CSVs")
    p.add_argument("--holdout-column", help="the column of --holdout-questions (default: query)")
    p.add_argument("--max-bad-fraction", type=float, help="fail without committing above this share of bad rows")
    p.add_argument("--on-bad-file", choices=["fail", "quarantine"], help="what an unreadable input file does")
    p.add_argument("--max-row-bytes", type=int, help="quarantine rows over this many bytes as row_too_large")
    _add_allow_empty(p)
    p.set_defaults(func=_reformulate)

    p = sub.add_parser("score", help="raw hh-rlhf pairs -> per-objective reward-model scores (Ray Data actor pool)")
    _add_config(p)
    p.add_argument("--input", help="raw rows (.jsonl[.gz], .parquet, .csv), local or s3://; one split")
    p.add_argument("--output", help="output folder (local or s3://) for the hh_rlhf_scores Parquet")
    p.add_argument("--format", choices=["hh_rlhf_raw"])
    p.add_argument("--reward-model", action="append", metavar="NAME=PATH",
                   help="objective name and sequence-classification folder; repeat, in score-column order")
    p.add_argument("--split", choices=["reference", "plain"],
                   help="reference (default): a space before the last '\\n\\nAssistant:', responses stripped, as "
                        "the reference; plain: split at the marker, rows that do not split cleanly quarantined")
    p.add_argument("--length-of", choices=["transcript", "input"],
                   help="count tokens of the whole transcripts (default, the reference; inputs truncated to the "
                        "limit) or of the model inputs (never truncated)")
    p.add_argument("--min-tokens", type=int, help="fewer tokens for any model: too_short (default 8, the reference)")
    p.add_argument("--decimals", type=int, help="round raw rewards to this many decimals before normalising")
    p.add_argument("--batch-size", type=int, help="rows per scoring call")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward pass")
    p.add_argument("--concurrency", type=int, help="scoring actors (one per GPU)")
    p.add_argument("--num-cpus", type=float, help="CPUs per scoring actor")
    p.add_argument("--num-gpus", type=float, help="GPUs per scoring actor")
    p.add_argument("--device", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-bad-fraction", type=float, help="fail without committing above this quarantined share")
    _add_allow_empty(p)
    p.set_defaults(func=_score)

    p = sub.add_parser("train", help="three-stage corrector training (Ray Train + DeepSpeed)")
    _add_config(p)
    p.add_argument("--stage", default="all", choices=["all", "warmup", "equal", "contrastive"])
    p.add_argument("--data", help="reformulated output (local or s3://) with contrastive/ and equal/")
    p.add_argument("--base-model", help="HF model folder (local or s3://)")
    p.add_argument("--output", help="where stages write exports, logs and summaries")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="per-objective win rates vs golden answers with a judge (Ray Data)")
    _add_config(p)
    p.add_argument("--input", help="JSONL/Parquet/CSV evaluation set (overrides evaluate.input)")
    p.add_argument("--output", help="results folder, local or s3:// (overrides evaluate.output)")
    p.add_argument("--seed", type=int)
    p.add_argument("--question-column", help="column with the question (default: question)")
    p.add_argument("--id-column", help="item id column (default: id; absent: a digest of the row)")
    p.add_argument("--golden", help="column with the golden answer")
    p.add_argument("--candidates", nargs="+", help="answer columns to judge")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL of the LLM judge (overrides evaluate.judge.url)")
    p.add_argument("--judge-model", help="model name sent to the judge")
    p.add_argument("--judge-prompt", choices=["paper", "released", "chat"], help="judge prompt (default: paper)")
    p.add_argument("--judge-sampling", choices=["paper", "released"],
                   help="paper: temperature 0, max_tokens 512 (default); released: neither field sent, as the "
                        "authors' scoring scripts")
    p.add_argument("--max-invalid-fraction", type=float, help="exit non-zero above this share of invalid verdicts")
    p.add_argument("--max-bad-fraction", type=float, help="stop before judging above this share of bad rows")
    _add_allow_empty(p)
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("serve", help="the correction API on Ray Serve (FastAPI, batching, autoscaling)")
    _add_config(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--create-tiny-model", action="store_true", help="demo: create a tiny random model at serve.corrector.model")
    p.set_defaults(func=_serve)

    p = sub.add_parser("correct", help="offline batch correction of question/answer rows (Ray Data actor pool)")
    _add_config(p)
    p.add_argument("--input", help="Parquet/JSONL/CSV file or folder (local or s3://) with question, answer "
                   "[, objectives] columns")
    p.add_argument("--output", help="output folder (local or s3://)")
    p.add_argument("--model", help="corrector HF folder (local or s3://)")
    p.add_argument("--adapter", help="LoRA adapter folder on top of --model (a training stage's adapter/)")
    p.add_argument("--template", choices=["paper", "hh_rlhf", "ultrafeedback", "imhi"])
    p.add_argument("--objectives", help="objective set for names: hh_rlhf | ultrafeedback | imhi | unseen | PATH.yaml")
    p.add_argument("--default-objectives", nargs="+", help="objective names for rows without objectives")
    p.add_argument("--concurrency", type=int, help="corrector actors")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-gpus", type=float, help="GPUs per corrector actor")
    p.add_argument("--question-column", help="column with the question (default: question)")
    p.add_argument("--answer-column", help="column with the answer to correct (default: answer)")
    p.add_argument("--id-column", help="row id column (default: id; absent: added, a digest of the row)")
    p.add_argument("--on-too-long", choices=["original", "truncate", "error"],
                   help="a prompt over the model's limit: keep the answer (default), cut its tail, or an error row")
    p.add_argument("--max-bad-fraction", type=float, help="fail without committing above this share of error rows")
    _add_allow_empty(p)
    p.set_defaults(func=_correct)

    p = sub.add_parser("pipeline", help="reformulate -> train -> correct -> evaluate, from one config")
    _add_config(p)
    p.add_argument("--steps", nargs="+", choices=["reformulate", "train", "correct", "evaluate"])
    p.add_argument("--summary", help="write all steps' summaries to this JSON file (local or s3://)")
    p.set_defaults(func=_pipeline)

    p = sub.add_parser("demo", help="the whole pipeline locally: sample data -> train -> serve -> evaluate")
    p.add_argument("--output", default="demo_output")
    p.add_argument("--quick", action="store_true", help="a smaller, faster setting (CI)")
    p.add_argument("--base-model", help="a local HF model folder (safetensors): train a LoRA corrector on it "
                                        "(ZeRO-2) instead of a tiny model from scratch")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("METAALIGNER_DEBUG"):
            raise
        print(f"metaaligner {args.command}: error: {e} (METAALIGNER_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
