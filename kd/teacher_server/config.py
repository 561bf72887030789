"""`teacher.server`: where the served teacher is, or how kdflow starts it.

    teacher:
      repo: HuggingFaceTB/SmolLM2-1.7B
      server:
        url: http://gpu-pool-3:8000          # a running engine (vLLM `vllm serve ... --max-logprobs 128`)
    # or
      server:
        launch: vllm                         # kdflow starts `vllm serve <teacher folder>` from .venv-vllm
        max_logprobs: 128
        engine_args: ["--tensor-parallel-size", "4"]

Exactly one of `url` and `launch`. This module imports only pydantic (kd.config imports it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TeacherServerConfig(BaseModel):
    """The teacher served by an inference engine (vLLM's OpenAI-compatible server): kdflow sends token ids
    to `POST /v1/completions` with `prompt_logprobs: k` and reads back the top-k per position."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    url: str | None = Field(
        None, min_length=1, pattern=r"^https?://",
        description="Base URL of a running OpenAI-compatible engine serving the teacher (`http://host:8000`; "
        "`/v1` is added). Credentials never belong here: put the key in the variable named by api_key_env.")
    launch: Literal["vllm"] | None = Field(
        None, description="Start the engine for this run instead: `vllm serve <teacher folder>` from the engine's "
        "own venv (`make vllm-venv`), on 127.0.0.1 and a free port; stopped when the step ends or fails.")
    venv: str = Field(
        ".venv-vllm", min_length=1,
        description="launch: the engine's venv (relative paths: to the kdflow checkout); `bin/vllm` is run from it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="The engine's --dtype (launch), or the one the running engine at `url` serves: part of "
        "the cache's identity. float32 matches the in-process teacher; bfloat16 is what a GPU pool serves (the "
        "identity probe's tolerance must allow it).")
    max_logprobs: int = Field(
        64, ge=-1, description="launch: the engine's --max-logprobs, its cap on prompt_logprobs per position "
        "(-1: the whole vocabulary). kd.top_k above the cap is refused (exit 2).")
    max_model_len: int | None = Field(
        None, gt=0, description="launch: the engine's --max-model-len (None: the model's own; set it on CPU, "
        "the KV cache is sized from it).")
    engine_args: list[str] = Field(
        default_factory=list, description="launch: more `vllm serve` arguments (`--tensor-parallel-size 4`, "
        "`--enforce-eager`, `--enable-prefix-caching`).")
    startup_timeout_s: float = Field(
        900.0, gt=0, description="launch: seconds to wait for the engine's /health before giving up.")
    served_model_name: str | None = Field(
        None, min_length=1, description="The model name the engine serves (its /v1/models id). None: launch "
        "names it `kdflow-teacher`; url expects the one model it lists.")
    api_key_env: str | None = Field(
        None, min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an environment variable holding the engine's API key (sent as a Bearer token; "
        "never logged or recorded).")
    concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once (bounded).")
    request_timeout_s: float = Field(600.0, gt=0, description="Seconds one request may take.")
    retries: int = Field(4, ge=0, le=20, description="Retries of a request after a connection error or HTTP 5xx/429.")
    retry_backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubled on each retry.")
    identity_probe: Literal["forward", "skip"] = Field(
        "forward", description="forward: compare the engine's log-probs on a short probe text with the configured "
        "teacher's own forward on this machine (loads it once, on CPU); skip: for a teacher too big to load here "
        "(its name, vocabulary and tokenizer are still checked).")
    probe_tolerance: float = Field(
        0.05, gt=0, description="Identity check: largest |Δ log p| allowed between the served teacher and the "
        "configured one on a short probe text (fp32 vs fp32 differ by ~1e-4; bf16 serving by ~1e-2; another "
        "model by whole nats).")

    @model_validator(mode="before")
    @classmethod
    def _null_list_is_default(cls, data):
        """Prefect's parameter check lets `null` through for an array (a cleared UI form field): the default."""
        if isinstance(data, dict) and data.get("engine_args", []) is None:
            data = {k: v for k, v in data.items() if k != "engine_args"}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherServerConfig":
        if (self.url is None) == (self.launch is None):
            raise ValueError("teacher.server needs exactly one of `url` (a running engine) and `launch: vllm`, "
                             f"got url={self.url!r}, launch={self.launch!r}")
        return self

    @property
    def model_name(self) -> str | None:
        return self.served_model_name or ("kdflow-teacher" if self.launch else None)
