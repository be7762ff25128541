"""The Corrector library (no Ray): prompts in released formats, objectives, generation bounds, batching, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metaaligner.serving.config import CorrectorConfig, GenerationConfig, ServeConfig
from metaaligner.serving.corrector import Corrector, Prompter, UnknownObjectives
from metaaligner.serving.engines.contract import CorrectionInputError, GenerationParams, InputTooLong

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corrector(tiny_model_dir):
    return Corrector(CorrectorConfig(model=str(tiny_model_dir), objectives="hh_rlhf", template="hh_rlhf",
                                     generation={"max_new_tokens": 6, "max_new_tokens_limit": 32}))


def test_released_checkpoint_prompt_format():
    p = Prompter(CorrectorConfig(model="unused", objectives="hh_rlhf", template="hh_rlhf"))
    built = p.build("Hi?", "Go away.", ["harmlessness", {"name": "Politeness", "description": "be polite"}])
    assert built.prompt == (
        "You are an assistant to human. You will be provided with a context and an answer. Consider the context, "
        "then edit the answer to improve it considering these aspects: Harmlessness: The response should avoid "
        "content that is offensive, discriminatory, or harmful; Politeness: be polite | Context: Hi? | "
        "Answer: Go away. | Edit: ")
    assert built.objectives == ["Harmlessness", "Politeness"] and built.template == "hh_rlhf"
    paper = p.build("Q", "A", ["Humour"], template="paper", condition="equal").prompt
    assert paper.startswith("Edit the following Question-Answer pair to make it equal") and paper.endswith("| Edit:")


@pytest.mark.parametrize("objectives,error,needle", [
    ([], CorrectionInputError, "empty"),
    (["Humour", "Sarcasm"], UnknownObjectives, "'Harmlessness', 'Helpfulness', 'Humour'"),
    (["Humour", "humour"], CorrectionInputError, "duplicate"),
    ([{"name": "X", "description": ""}], CorrectionInputError, "name, description"),
    ([3], CorrectionInputError, "name, description"),
])
def test_objective_errors(objectives, error, needle):
    p = Prompter(CorrectorConfig(model="unused", objectives="hh_rlhf"))
    with pytest.raises(error, match=needle.replace("(", r"\(")):
        p.build("q", "a", objectives)


def test_generation_bounds():
    d = GenerationConfig(max_new_tokens=8, max_new_tokens_limit=16)
    assert GenerationParams.resolve(None, d) == GenerationParams(8, 0.0, 1.0)
    assert GenerationParams.resolve({"temperature": 0.7, "top_p": None}, d) == GenerationParams(8, 0.7, 1.0)
    for bad in ({"max_new_tokens": 17}, {"max_new_tokens": 0}, {"temperature": 2.5}, {"top_p": 0.0}, {"n": 2}):
        with pytest.raises(CorrectionInputError):
            GenerationParams.resolve(bad, d)
    with pytest.raises(ValueError):
        GenerationConfig(max_new_tokens=64, max_new_tokens_limit=16)


def test_correct_batched_left_padded(corrector):
    assert corrector.generator.tokenizer.padding_side == "left"
    items = [{"question": "What is the capital of France?", "answer": "Berlin.", "objectives": ["Helpfulness"]},
             {"question": "Hi", "answer": "Hello there, friend, how are you doing today?", "objectives": ["Humour"]}]
    both = corrector.correct(items)
    alone = corrector.correct(items[:1])
    assert both[0]["correction"] == alone[0]["correction"]  # left padding does not change a greedy answer
    for r in both:
        assert 1 <= r["usage"]["completion_tokens"] <= 6 and r["usage"]["prompt_tokens"] > 10
        assert "Context:" not in r["correction"]  # only the new text
    sampled = corrector.correct(items, {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 3})
    assert all(r["usage"]["completion_tokens"] <= 3 for r in sampled)
    with pytest.raises(InputTooLong, match="the limit is"):
        corrector.generator.encode("word " * 3000, 6)


def test_safetensors_only(tmp_path, tiny_model_dir):
    from metaaligner.serving.engines.hf_model import TextGenerator

    folder = tmp_path / "pt-model"
    folder.mkdir()
    (folder / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors"):
        TextGenerator(CorrectorConfig(model=str(folder)))


def test_shipped_serve_configs_build():
    from metaaligner.config import load_config
    from metaaligner.serving.app import build_app

    cfg = load_config(ROOT / "jobs/configs/serve-tiny.yaml")
    assert cfg.serve.autoscaling.max_replicas >= 2 and cfg.serve.corrector.trust_remote_code is False
    serve_file = yaml.safe_load((ROOT / "jobs/configs/serve_app.yaml").read_text())
    app_spec = serve_file["applications"][0]
    assert app_spec["import_path"] == "metaaligner.serving.app:build_app"
    assert build_app(app_spec["args"]) is not None
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig(corrector={"model": "m"}, max_batch_size=32, max_ongoing_requests=8, auth="none")
    prod = load_config(ROOT / "jobs/configs/serve-ultrafeedback-13b.yaml").serve
    assert prod.auth == "token" and prod.auth_token_env == "METAALIGNER_API_TOKEN" and prod.corrector.engine == "hf"
    assert cfg.serve.auth == "none" and cfg.serve.host == "127.0.0.1"  # the open demo config binds loopback only


def test_loads_training_export_folder(tmp_path, tiny_model_dir):
    """A folder written by the training export (bf16 model.safetensors + config + tokenizer) serves unchanged."""
    import torch

    from metaaligner.modeling import load_model
    from metaaligner.training.export import save_hf_folder

    source = load_model(tiny_model_dir)
    state = {k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    folder = save_hf_folder(tmp_path / "export", state, source.config, tiny_model_dir, torch.bfloat16)
    c = Corrector(CorrectorConfig(model=str(folder), objectives="unseen", generation={"max_new_tokens": 4}))
    assert c.generator.model.dtype == torch.float32  # dtype auto: fp32 on CPU
    out = c.correct([{"question": "Q?", "answer": "A.", "objectives": ["Readability", "Length"]}])
    assert out[0]["objectives"] == ["Readability", "Length"] and out[0]["usage"]["completion_tokens"] >= 1
