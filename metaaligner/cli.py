"""`metaaligner` command line: thin subcommands over the library, all driven by the shared config."""

from __future__ import annotations

import argparse
import os
import sys

from metaaligner.config import load_config


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (shared schema); flags override its values")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")


def _section(args, section: str, flags: tuple[str, ...], hint: str):
    """Load --config, let the given flags override `section.<flag>`, and return (config, section)."""
    overrides = {"storage.endpoint_url": args.endpoint_url, **{f"{section}.{f}": getattr(args, f) for f in flags}}
    cfg = load_config(args.config, overrides)
    if getattr(cfg, section) is None:
        raise SystemExit(f"{section}: {hint}")
    return cfg, getattr(cfg, section)


def _reformulate(args) -> int:
    from metaaligner.data.pipeline import run_reformulation

    cfg, rf = _section(args, "reformulate", ("input", "output", "format", "objectives", "template", "seed",
                                             "score_decimals"), "give --input and --output (or a config with a reformulate section)")
    summary = run_reformulation(rf, cfg.storage)
    print(f"reformulated {summary['valid_pairs']} pairs into {summary['items_total']} items "
          f"({summary['quarantined']} quarantined) in {summary['wall_time_s']:.1f}s -> {rf.output}")
    return 0


def _evaluate(args) -> int:
    from metaaligner.evaluation.job import run_evaluation

    cfg, ev = _section(args, "evaluate", ("input", "output", "seed"),
                       "give --config with an evaluate section (or --input and --output)")
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

    cfg, cc = _section(args, "correct", ("input", "output", "model", "template", "objectives", "default_objectives",
                                         "concurrency", "batch_size", "num_gpus"),
                       "give --input, --output and --model (or a config with a correct section)")
    s = run_correction(cc, cfg.storage)
    print(f"corrected {s['corrected']}/{s['rows']} rows ({s['errors']} errors) in {s['wall_time_s']:.1f}s, "
          f"{s['generated_tokens_per_s']:.0f} generated tok/s -> {cc.output}")
    return 0


def _train(args) -> int:
    from metaaligner.training.trainer import run_training

    cfg, tr = _section(args, "train", ("data", "base_model", "output"), "the config needs a train section")
    summaries = run_training(tr, cfg.storage, args.stage)
    for name, s in summaries.items():
        print(f"{name}: {s['steps']} steps, loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}, "
              f"{s['dropped']} rows dropped, exported {s['export']}")
    return 0


def _pipeline(args) -> int:
    from metaaligner.pipeline import STEPS, run_pipeline

    cfg = load_config(args.config, {"storage.endpoint_url": args.endpoint_url})
    results = run_pipeline(cfg, tuple(args.steps or STEPS), summary_uri=args.summary)
    print(f"pipeline finished in {results['wall_time_s']:.1f}s: {', '.join(k for k in results if k in STEPS)}")
    return 0


def _demo(args) -> int:
    from metaaligner.demo import DemoConfig, run_demo

    run_demo(DemoConfig(output=args.output, quick=args.quick))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaaligner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reformulate", help="preference pairs -> contrastive/equal correction items (Ray Data)")
    _add_config(p)
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--format", choices=["canonical", "ultrafeedback", "hh_rlhf_scores"])
    p.add_argument("--objectives", help="hh_rlhf | ultrafeedback | imhi | PATH.yaml")
    p.add_argument("--template", choices=["paper", "hh_rlhf", "ultrafeedback", "imhi"])
    p.add_argument("--seed", type=int)
    p.add_argument("--score-decimals", type=int)
    p.set_defaults(func=_reformulate)

    p = sub.add_parser("train", help="three-stage corrector training (Ray Train + DeepSpeed)")
    _add_config(p)
    p.add_argument("--stage", default="all", choices=["all", "warmup", "equal", "contrastive"])
    p.add_argument("--data", help="reformulated output (local or s3://) with contrastive/ and equal/")
    p.add_argument("--base-model", help="HF model folder (local or s3://)")
    p.add_argument("--output", help="where stages write exports, logs and summaries")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="per-objective win rates vs golden answers with a judge (Ray Data)")
    _add_config(p)
    p.add_argument("--input", help="JSONL/Parquet evaluation set (overrides evaluate.input)")
    p.add_argument("--output", help="results folder, local or s3:// (overrides evaluate.output)")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("serve", help="the correction API on Ray Serve (FastAPI, batching, autoscaling)")
    _add_config(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--create-tiny-model", action="store_true", help="demo: create a tiny random model at serve.corrector.model")
    p.set_defaults(func=_serve)

    p = sub.add_parser("correct", help="offline batch correction of question/answer rows (Ray Data actor pool)")
    _add_config(p)
    p.add_argument("--input", help="Parquet/JSONL file or folder (local or s3://) with question, answer[, objectives]")
    p.add_argument("--output", help="output folder (local or s3://)")
    p.add_argument("--model", help="corrector HF folder (local or s3://)")
    p.add_argument("--template", choices=["paper", "hh_rlhf", "ultrafeedback", "imhi"])
    p.add_argument("--objectives", help="objective set for names: hh_rlhf | ultrafeedback | imhi | unseen | PATH.yaml")
    p.add_argument("--default-objectives", nargs="+", help="objective names for rows without objectives")
    p.add_argument("--concurrency", type=int, help="corrector actors")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-gpus", type=float, help="GPUs per corrector actor")
    p.set_defaults(func=_correct)

    p = sub.add_parser("pipeline", help="reformulate -> train -> correct -> evaluate, from one config")
    _add_config(p)
    p.add_argument("--steps", nargs="+", choices=["reformulate", "train", "correct", "evaluate"])
    p.add_argument("--summary", help="write all steps' summaries to this JSON file (local or s3://)")
    p.set_defaults(func=_pipeline)

    p = sub.add_parser("demo", help="the whole pipeline locally: sample data -> train -> serve -> evaluate")
    p.add_argument("--output", default="demo_output")
    p.add_argument("--quick", action="store_true", help="a smaller, faster setting (CI)")
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
