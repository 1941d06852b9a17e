"""`python -m pipeline serve`: a finished run's policies, with its reward and cost models, on Ray Serve.

One Serve application (`safe_rlhf`), its deployments named like the architecture on the
dashboard's Serve page:

    ingress              FastAPI: the OpenAI-style routes below
    policy-<stage>       one per served policy (`sft`, `safe_rlhf-3`, ...): a vLLM or transformers engine
    scorer-reward        the run's last fitted reward model, batched (@serve.batch)
    scorer-cost          the run's last fitted cost model, batched

Routes: POST /v1/chat/completions and /v1/completions (OpenAI's request and response shape, `model`
a stage name; every choice also carries "safety": {"reward", "cost", "safe"}, safe meaning
cost <= 0, the cost model's line), GET /v1/models, POST /v1/score ({"prompt", "response"} or a
list of them), GET /healthz.

Safety gate (`serve.gate`, or a request's "gate"): "none", or "best_of_n": sample n candidates,
return the highest-reward one whose cost is at most the threshold (the served round's own, or
`serve.gate_threshold`), else `serve.refusal`; the response says how many were drawn and passed.

Bad input never takes the service down: each gets a 4xx JSON error naming the field (OpenAI's
{"error": {"message", "type", "param"}}) and the service goes on answering.
`app_builder` is the import path `serve deploy` uses (the serve command writes RUN/serve_config.yaml).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from actors.serving import PolicyServer, ScoreServer
from stages.text import format_prompt

APP_NAME = "safe_rlhf"
api = FastAPI(title="Safe RLHF on Ray", description="A finished run's policies with reward and cost on every answer.")


# ---------------------------------------------------------------------- requests
class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logprobs, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, gt=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    gate: Literal["none", "best_of_n"] | None = None
    stream: bool = False


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampled):
    prompt: str = Field(min_length=1)


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    response: str


class ApiError(Exception):
    def __init__(self, status: int, param: str | None, message: str):
        self.status, self.param, self.message = status, param, message


def _error(status: int, param: str | None, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                               "param": param}})


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    # Drop "body" and the tags of a union's branches ("ScoreItem", "list[ScoreItem]"): fields are snake_case.
    loc = [str(p) for p in first["loc"] if p != "body" and not (isinstance(p, str) and (p[:1].isupper() or "[" in p))]
    if first["type"] == "json_invalid":
        return _error(400, "body", f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    return _error(400, ".".join(loc) or "body", first["msg"])


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.param, exc.message)


def chat_prompt(messages: list[Message]) -> tuple[str, list[dict]]:
    """(the last user message, the earlier turns) in the template's terms; system messages go first."""
    if messages[-1].role != "user":
        raise ApiError(400, "messages", "the last message must be the user's")
    if not messages[-1].content.strip():
        raise ApiError(400, "messages", "the last user message is empty")
    turns = [{"role": "user" if m.role in ("user", "system") else "assistant", "text": m.content} for m in messages[:-1]]
    return messages[-1].content, turns


# ---------------------------------------------------------------------- deployments
class PolicyDeployment(PolicyServer):
    pass


class ScorerDeployment(ScoreServer):
    def __init__(self, *args, batch_size: int, batch_wait_s: float):
        super().__init__(*args)
        self.score_one.set_max_batch_size(batch_size)
        self.score_one.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # sizes set from serve.batch_* in __init__
    async def score_one(self, items: list[tuple[str, str, list]]) -> list[float]:
        """Calls with one (prompt, answer, earlier turns) each; Serve hands them over as one batch."""
        return self.score(items)


@serve.ingress(api)
class Ingress:
    def __init__(self, policies: dict, reward, cost, info: dict, limits: dict):
        """policies {stage: handle}; info {stage: {"threshold", "context"}}; limits: serve config fields."""
        self.policies, self.reward, self.cost, self.info, self.limits = policies, reward, cost, info, limits

    async def _safety(self, prompt: str, context: list, answers: list[str]) -> list[dict]:
        rewards = await asyncio.gather(*[self.reward.score_one.remote((prompt, a, context)) for a in answers])
        costs = await asyncio.gather(*[self.cost.score_one.remote((prompt, a, context)) for a in answers])
        return [{"reward": float(r), "cost": float(c), "safe": bool(c <= 0)} for r, c in zip(rewards, costs)]

    async def _answers(self, req: Sampled, prompt: str, context: list, field: str) -> dict:
        if req.stream:
            raise ApiError(400, "stream", "streaming is not supported")
        if req.model not in self.policies:
            raise ApiError(404, "model", f"unknown model {req.model!r}; served: {', '.join(self.policies)}")
        lim, info = self.limits, self.info[req.model]
        max_tokens = req.max_tokens or lim["max_tokens"]
        if max_tokens > lim["max_tokens_limit"]:
            raise ApiError(400, "max_tokens", f"max_tokens {max_tokens} is above this service's limit of {lim['max_tokens_limit']}")
        gate = req.gate or lim["gate"]
        n = req.n or (lim["gate_n"] if gate == "best_of_n" else 1)
        if n > lim["max_n"]:
            raise ApiError(400, "n", f"n {n} is above this service's limit of {lim['max_n']}")
        policy = self.policies[req.model]
        text = format_prompt(prompt, context)
        prompt_tokens = await policy.prompt_tokens.remote(text)
        if prompt_tokens + max_tokens > info["context"]:
            raise ApiError(400, field, f"the prompt is {prompt_tokens} tokens; with max_tokens {max_tokens} it is longer "
                                       f"than the model's context of {info['context']} tokens")
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        drawn = await policy.generate.remote(text, n, max_tokens, req.temperature, req.top_p, seed)
        safety = await self._safety(prompt, context, [d["text"] for d in drawn])
        out = {"prompt_tokens": prompt_tokens}
        if gate == "none":
            out["choices"] = [{**d, "safety": s} for d, s in zip(drawn, safety)]
            return out
        threshold = info["threshold"]
        passed = [i for i, s in enumerate(safety) if s["cost"] <= threshold]
        if passed:
            best = max(passed, key=lambda i: safety[i]["reward"])
            out["choices"] = [{**drawn[best], "safety": safety[best]}]
        else:
            refusal = lim["refusal"]
            tokens = len(refusal.split())
            out["choices"] = [{"text": refusal, "tokens": tokens, "finish_reason": "stop",
                               "safety": (await self._safety(prompt, context, [refusal]))[0]}]
        out["gate"] = {"mode": "best_of_n", "candidates": n, "passed": len(passed), "threshold": threshold,
                       "refused": not passed}
        return out

    @staticmethod
    def _response(kind: str, model: str, got: dict, chat: bool) -> dict:
        choices = [{"index": i, "finish_reason": c["finish_reason"], "safety": c["safety"],
                    **({"message": {"role": "assistant", "content": c["text"]}} if chat else {"text": c["text"]})}
                   for i, c in enumerate(got["choices"])]
        completion = sum(c["tokens"] for c in got["choices"])
        out = {"id": f"{kind}-{uuid.uuid4().hex[:24]}", "object": "chat.completion" if chat else "text_completion",
               "created": int(time.time()), "model": model, "choices": choices,
               "usage": {"prompt_tokens": got["prompt_tokens"], "completion_tokens": completion,
                         "total_tokens": got["prompt_tokens"] + completion}}
        if "gate" in got:
            out["gate"] = got["gate"]
        return out

    @api.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest) -> dict:
        prompt, context = chat_prompt(req.messages)
        return self._response("chatcmpl", req.model, await self._answers(req, prompt, context, "messages"), chat=True)

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> dict:
        return self._response("cmpl", req.model, await self._answers(req, req.prompt, [], "prompt"), chat=False)

    @api.post("/v1/score")
    async def score(self, body: ScoreItem | list[ScoreItem]) -> dict:
        items = body if isinstance(body, list) else [body]
        if not items:
            raise ApiError(400, "body", "an empty list: give {\"prompt\", \"response\"} or a list of them")
        safety = await asyncio.gather(*[self._safety(i.prompt, [], [i.response]) for i in items])
        results = [s[0] for s in safety]
        return {"object": "list", "data": results} if isinstance(body, list) else results[0]

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "safe-rlhf-ray",
                                            "threshold": info["threshold"]} for name, info in self.info.items()]}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": list(self.policies)}


# ---------------------------------------------------------------------- the application
def _done(run: Path, stage: str) -> bool:
    return (run / "stages" / stage / "manifest.json").is_file()


def served_policies(run_dir: str | Path, cfg, names: list[str] | None) -> dict[str, dict]:
    """{stage: {"model_dir", "threshold"}} for the policies to serve (default: the last round)."""
    import json

    run = Path(run_dir).resolve()
    rounds = sorted((p.name for p in (run / "stages").glob("safe_rlhf@*") if _done(run, p.name)),
                    key=lambda n: int(n.split("@")[1]))
    if not names:
        if not rounds:
            raise ValueError(f"{run} has no finished round to serve; name one with --policy (e.g. sft)")
        names = rounds[-1:]
    out = {}
    for name in names:
        if name == "sft":
            model = run / "stages" / "sft" / "model" if _done(run, "sft") else (Path(cfg.model.path) if cfg.model.path else None)
            threshold = None
        elif name.startswith(("safe_rlhf@", "baseline_")) and _done(run, name):
            model = run / "stages" / name / "policy"
            threshold = json.loads((run / "stages" / name / "manifest.json").read_text())["metrics"].get("threshold")
        else:
            model = None
        if model is None or not model.exists():
            done = ["sft"] + rounds + sorted(p.name for p in (run / "stages").glob("baseline_*") if _done(run, p.name))
            raise ValueError(f"--policy {name}: not a finished policy of {run}; these are: {', '.join(done)}")
        if cfg.serve.gate_threshold is not None or threshold is None:
            threshold = cfg.serve.gate_threshold if cfg.serve.gate_threshold is not None else 0.0
        out[name] = {"model_dir": str(model), "threshold": float(threshold)}
    return out


def last_fitted(run: Path, base: str) -> Path:
    done = [p.name for p in (run / "stages").glob(f"{base}*") if _done(run, p.name)]
    if not done:
        raise ValueError(f"{run} has no finished {base} stage: the reward and cost models are needed")
    last = max(done, key=lambda n: int(n.split("@")[1]) if "@" in n else 1)
    return run / "stages" / last / "model"


def build_app(run_dir: str | Path, cfg, policy_names: list[str] | None = None):
    """The Serve application for a finished run (cfg: the run's RunConfig)."""
    from stages.model_actors import engine_settings

    run, sc, rl = Path(run_dir).resolve(), cfg.serve, cfg.safe_rlhf
    policies = served_policies(run, cfg, policy_names)
    engine = sc.engine or rl.engine
    gpu = 1 if rl.device == "cuda" else 0
    scale = (lambda n: {"autoscaling_config": {"min_replicas": n, "max_replicas": max(n, sc.max_replicas)}}) if sc.autoscaling \
        else (lambda n: {"num_replicas": n})
    actor = {"num_cpus": rl.cpus_per_actor, "num_gpus": gpu,
             "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1",
                                          "HF_HUB_DISABLE_PROGRESS_BARS": "1", "VLLM_LOGGING_LEVEL": "WARNING",
                                          "SAFE_RLHF_VLLM_WARNINGS_ONCE": "1", "TRANSFORMERS_VERBOSITY": "error"}}}
    context = cfg.model.max_prompt_tokens + sc.max_tokens_limit
    handles, info = {}, {}
    for name, p in policies.items():
        dep = serve.deployment(PolicyDeployment).options(name=f"policy-{name.replace('@', '-')}", ray_actor_options=actor,
                                                         **scale(sc.policy_replicas))
        handles[name] = dep.bind(p["model_dir"], engine, engine_settings(cfg, engine, sc.max_tokens_limit), context)
        info[name] = {"threshold": p["threshold"], "context": context}
    scorer = {}
    for role in ("reward", "cost"):
        dep = serve.deployment(ScorerDeployment).options(name=f"scorer-{role}", ray_actor_options=actor,
                                                         **scale(sc.scorer_replicas))
        scorer[role] = dep.bind(role, str(last_fitted(run, f"fit_{role}")), rl.device, rl.precision,
                                cfg.model.max_prompt_tokens, sc.max_tokens_limit,
                                batch_size=sc.batch_size, batch_wait_s=sc.batch_wait_s)
    limits = {k: getattr(sc, k) for k in ("max_tokens", "max_tokens_limit", "max_n", "gate", "gate_n", "refusal")}
    ingress = serve.deployment(Ingress).options(name="ingress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(handles, scorer["reward"], scorer["cost"], info, limits)


def app_builder(args: dict):
    """`serve deploy` import path: args {"run_dir": ..., "policies": [...] (optional)}."""
    from pipeline.config import load_config

    run = Path(args["run_dir"])
    return build_app(run, load_config(run / "config.yaml"), args.get("policies"))


def serve_config(run_dir: Path, cfg, policies: list[str]) -> dict:
    """A config file for `serve deploy` on a cluster: the same application and import path."""
    return {"proxy_location": "EveryNode", "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "pipeline.serve:app_builder",
                              "args": {"run_dir": str(Path(run_dir).resolve()), "policies": policies}}]}
