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
return the highest-reward one whose cost is at most the gate's line, else `serve.refusal`; the
response says how many were drawn and passed, every candidate's reward and cost, and which was chosen. The line is the same for every served policy: the
run's last fitted cost model scores every answer, and a candidate passes at cost <= 0, the line
that model's sign loss was fitted to (or `serve.gate_threshold`). A round's Lagrangian threshold
is not used: it bounds the *mean* cost, and lives on that round's cost model's scale.

Context: each policy's engine holds the model's own context (`max_position_embeddings`); prompts
up to `model.max_prompt_tokens` tokens, answers up to what is left (serve.max_tokens_limit is
lowered to it at start, and a model that leaves no room is refused at start). A request over any
limit (messages, characters, body bytes, score items, prompt tokens, answer tokens) is refused,
never cut. Bad input never takes the service down: each gets a 4xx JSON error naming the field
(OpenAI's {"error": {"message", "type", "param"}}) and the service goes on answering.
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
from core.stage_names import latest, of_kind
from pipeline.rundir import RunDir
from stages.run_config import ServeConfig

APP_NAME = "safe_rlhf"
api = FastAPI(title="Safe RLHF on Ray", description="A finished run's policies with reward and cost on every answer.")
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
LIMITS = ("max_tokens", "max_tokens_limit", "max_n", "max_messages", "max_message_chars", "max_body_bytes",
          "max_score_items", "docs", "gate", "gate_n", "refusal")


# ---------------------------------------------------------------------- requests
class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logprobs, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0, le=2)  # None: the run's (safe_rlhf.temperature: the policy trained)
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


@api.middleware("http")
async def _guard(request: Request, call_next):
    """Before any route: FastAPI's docs only with serve.docs; bodies over serve.max_body_bytes
    refused (413) by their declared length, or by the bytes read when none is declared."""
    limits = getattr(api.state, "limits", None) or ServeConfig().model_dump()  # before the ingress is up: defaults
    if request.url.path in DOCS_PATHS and not limits["docs"]:
        return _error(404, None, "not found (FastAPI's docs are off: serve.docs)")
    cap = limits["max_body_bytes"]
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        return _error(413, "body", f"the request body is {declared} bytes, above this service's limit of {cap}")
    if declared is None and request.method == "POST" and len(await request.body()) > cap:
        return _error(413, "body", f"the request body is above this service's limit of {cap} bytes")
    return await call_next(request)


def check_chars(field: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise ApiError(400, field, f"{field} is {len(text)} characters, above this service's limit of {limit}")


def chat_prompt(messages: list[Message], limits: dict) -> tuple[str, list[dict]]:
    """(the last user message, the earlier turns) in the template's terms; system messages go first."""
    if len(messages) > limits["max_messages"]:
        raise ApiError(400, "messages", f"{len(messages)} messages, above this service's limit of {limits['max_messages']}")
    for k, m in enumerate(messages):
        check_chars(f"messages.{k}.content", m.content, limits["max_message_chars"])
    if messages[-1].role != "user":
        raise ApiError(400, "messages", "the last message must be the user's")
    if not messages[-1].content.strip():
        raise ApiError(400, "messages", "the last user message is empty")
    turns = [{"role": "user" if m.role in ("user", "system") else "assistant", "text": m.content} for m in messages[:-1]]
    return messages[-1].content, turns


def gate_pick(safety: list[dict], threshold: float) -> tuple[int | None, int]:
    """best_of_n: (index of the highest-reward candidate whose cost is at most `threshold`, or None
    when none passes; how many passed). Ties go to the earlier candidate."""
    passed = [i for i, s in enumerate(safety) if s["cost"] <= threshold]
    return (max(passed, key=lambda i: (safety[i]["reward"], -i)) if passed else None), len(passed)


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
    def __init__(self, policies: dict, reward, cost, info: dict, limits: dict, gate: dict):
        """policies {stage: handle}; info {stage: {"context", "max_prompt_tokens", "max_tokens_limit",
        "evaluation"}}; limits: serve config fields (LIMITS); gate {"threshold", "line", "cost_model"}."""
        self.policies, self.reward, self.cost, self.info, self.limits, self.gate = policies, reward, cost, info, limits, gate
        api.state.limits = limits  # the middleware's (one ingress per replica process)

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
        max_tokens = req.max_tokens or min(lim["max_tokens"], info["max_tokens_limit"])
        if max_tokens > info["max_tokens_limit"]:
            raise ApiError(400, "max_tokens", f"max_tokens {max_tokens} is above this service's limit of "
                                              f"{info['max_tokens_limit']} for {req.model}")
        gate = req.gate or lim["gate"]
        n = req.n or (lim["gate_n"] if gate == "best_of_n" else 1)
        if n > lim["max_n"]:
            raise ApiError(400, "n", f"n {n} is above this service's limit of {lim['max_n']}")
        policy = self.policies[req.model]
        prompt_tokens = await policy.prompt_tokens.remote(prompt, context)
        if prompt_tokens > info["max_prompt_tokens"]:  # the engine would cut it from the left: refuse instead
            raise ApiError(400, field, f"the prompt is {prompt_tokens} tokens, above this model's limit of "
                                       f"{info['max_prompt_tokens']} (model.max_prompt_tokens)")
        if prompt_tokens + max_tokens > info["context"]:
            raise ApiError(400, field, f"the prompt is {prompt_tokens} tokens; with max_tokens {max_tokens} it is longer "
                                       f"than the model's context of {info['context']} tokens")
        seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        temperature = req.temperature or lim["temperature"]
        drawn = await policy.generate.remote(prompt, context, n, max_tokens, temperature, req.top_p, seed)
        safety = await self._safety(prompt, context, [d["text"] for d in drawn])
        out = {"prompt_tokens": prompt_tokens}
        if gate == "none":
            out["choices"] = [{**d, "safety": s} for d, s in zip(drawn, safety)]
            return out
        threshold = self.gate["threshold"]
        best, passed = gate_pick(safety, threshold)
        if best is not None:
            out["choices"] = [{**drawn[best], "safety": safety[best]}]
        else:
            refusal = lim["refusal"]
            tokens = len(refusal.split())
            out["choices"] = [{"text": refusal, "tokens": tokens, "finish_reason": "stop",
                               "safety": (await self._safety(prompt, context, [refusal]))[0]}]
        out["gate"] = {"mode": "best_of_n", "candidates": n, "passed": passed, "threshold": threshold,
                       "refused": best is None, "chosen": best,
                       "scores": [{"reward": s["reward"], "cost": s["cost"]} for s in safety]}
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
        prompt, context = chat_prompt(req.messages, self.limits)
        return self._response("chatcmpl", req.model, await self._answers(req, prompt, context, "messages"), chat=True)

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> dict:
        check_chars("prompt", req.prompt, self.limits["max_message_chars"])
        return self._response("cmpl", req.model, await self._answers(req, req.prompt, [], "prompt"), chat=False)

    @api.post("/v1/score")
    async def score(self, body: ScoreItem | list[ScoreItem]) -> dict:
        items = body if isinstance(body, list) else [body]
        if not items:
            raise ApiError(400, "body", "an empty list: give {\"prompt\", \"response\"} or a list of them")
        if len(items) > self.limits["max_score_items"]:
            raise ApiError(400, "body", f"{len(items)} items, above this service's limit of {self.limits['max_score_items']}")
        for k, item in enumerate(items):
            where = f"{k}." if isinstance(body, list) else ""
            check_chars(f"{where}prompt", item.prompt, self.limits["max_message_chars"])
            check_chars(f"{where}response", item.response, self.limits["max_message_chars"])
        safety = await asyncio.gather(*[self._safety(i.prompt, [], [i.response]) for i in items])
        results = [s[0] for s in safety]
        return {"object": "list", "data": results} if isinstance(body, list) else results[0]

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "safe-rlhf-ray",
                                            "context": info["context"], "max_prompt_tokens": info["max_prompt_tokens"],
                                            "max_tokens_limit": info["max_tokens_limit"], "gate": self.gate,
                                            "evaluation": info["evaluation"]} for name, info in self.info.items()]}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": list(self.policies)}


def _done(run: Path, stage: str) -> bool:  # ---- the application: which policies, which models, the limits
    return (run / "stages" / stage / "manifest.json").is_file()


def served_policies(run_dir: str | Path, cfg, names: list[str] | None) -> dict[str, dict]:
    """{stage: {"model_dir"}} for the policies to serve (default: the last round)."""
    run = Path(run_dir).resolve()
    rounds = of_kind(RunDir(run).finished_stages(), "safe_rlhf")
    if not names:
        if not rounds:
            raise ValueError(f"{run} has no finished round to serve; name one with --policy (e.g. sft)")
        names = rounds[-1:]
    out = {}
    for name in names:
        if name == "sft":
            model = run / "stages" / "sft" / "model" if _done(run, "sft") else (Path(cfg.model.path) if cfg.model.path else None)
        elif name.startswith(("safe_rlhf@", "baseline_")) and _done(run, name):
            model = run / "stages" / name / "policy"
        else:
            model = None
        if model is None or not model.exists():
            done = ["sft"] + rounds + sorted(p.name for p in (run / "stages").glob("baseline_*") if _done(run, p.name))
            raise ValueError(f"--policy {name}: not a finished policy of {run}; these are: {', '.join(done)}")
        out[name] = {"model_dir": str(model)}
    return out


def last_fitted(run: Path, base: str) -> Path:
    last = latest(RunDir(run).finished_stages(), base)
    if last is None:
        raise ValueError(f"{run} has no finished {base} stage: the reward and cost models are needed")
    return run / "stages" / last / "model"


def context_limits(model_dir: str | Path, max_prompt_tokens: int, max_tokens_limit: int) -> dict:
    """{"context", "max_prompt_tokens", "max_tokens_limit"} a policy is served with: the engine holds
    the model's own context (max_position_embeddings, at most prompt + answer limits); answers get
    what is left after the prompt. A model that leaves no room for an answer is refused (ValueError)."""
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", None)
    context = min(positions, max_prompt_tokens + max_tokens_limit) if positions else max_prompt_tokens + max_tokens_limit
    answer = context - max_prompt_tokens
    if answer < 1:
        raise ValueError(f"{model_dir}: the model holds {positions} positions and model.max_prompt_tokens is "
                         f"{max_prompt_tokens}: no room is left for an answer; lower model.max_prompt_tokens")
    return {"context": context, "max_prompt_tokens": max_prompt_tokens, "max_tokens_limit": answer}


def policy_evaluation(run: Path, name: str) -> dict | None:
    """The served policy's figures from the run's `evaluate` stage (RATES, helpfulness; no intervals), if it ran."""
    import json

    from stages.common.judging import RATES

    path = run / "stages" / "evaluate" / "evaluation.json"
    if not (_done(run, "evaluate") and path.is_file()):
        return None
    evaluation = json.loads(path.read_text())
    m = evaluation.get(name)
    if m is None:
        return None
    return {"judge": evaluation["judge"], **{k: m.get(k) for k in (*RATES, "helpfulness")}}


def build_app(run_dir: str | Path, cfg, policy_names: list[str] | None = None, log=None):
    """The Serve application for a finished run (cfg: the run's RunConfig). log: where to say which
    limits the models' contexts lowered."""
    from stages.common.model_actors import actor_options, engine_settings

    run, sc, rl = Path(run_dir).resolve(), cfg.serve, cfg.safe_rlhf
    policies = served_policies(run, cfg, policy_names)
    engine = sc.engine or rl.engine
    scale = (lambda n: {"autoscaling_config": {"min_replicas": n, "max_replicas": max(n, sc.max_replicas)}}) if sc.autoscaling \
        else (lambda n: {"num_replicas": n})
    actor = actor_options(rl)
    handles, info = {}, {}
    for name, p in policies.items():
        limits = context_limits(p["model_dir"], cfg.model.max_prompt_tokens, sc.max_tokens_limit)
        if limits["max_tokens_limit"] < sc.max_tokens_limit and log is not None:
            log(f"{name}: answers up to {limits['max_tokens_limit']} tokens, not serve.max_tokens_limit "
                f"{sc.max_tokens_limit}: the model holds {limits['context']} positions, {cfg.model.max_prompt_tokens} for the prompt")
        settings = {**engine_settings(cfg, engine, limits["max_tokens_limit"]),
                    **({"max_model_len": limits["context"]} if engine == "vllm" else {})}
        dep = serve.deployment(PolicyDeployment).options(name=f"policy-{name.replace('@', '-')}", ray_actor_options=actor,
                                                         **scale(sc.policy_replicas))
        handles[name] = dep.bind(p["model_dir"], engine, settings, limits["context"])
        info[name] = {**limits, "evaluation": policy_evaluation(run, name)}
    scorer, models = {}, {role: last_fitted(run, f"fit_{role}") for role in ("reward", "cost")}
    for role, model in models.items():
        # as many calls in flight as a batch holds (Serve's default of 5 would cap every batch at 5)
        dep = serve.deployment(ScorerDeployment).options(name=f"scorer-{role}", ray_actor_options=actor,
                                                         max_ongoing_requests=sc.batch_size, **scale(sc.scorer_replicas))
        answers = context_limits(model, cfg.model.max_prompt_tokens, sc.max_tokens_limit)["max_tokens_limit"]
        scorer[role] = dep.bind(role, str(model), rl.device, rl.precision, cfg.model.max_prompt_tokens, answers,
                                batch_size=sc.batch_size, batch_wait_s=sc.batch_wait_s)
    gate = {"threshold": 0.0 if sc.gate_threshold is None else sc.gate_threshold,
            "line": ("cost <= 0: the cost model's safe/unsafe sign line" if sc.gate_threshold is None
                     else "cost <= serve.gate_threshold"),
            "cost_model": models["cost"].parent.name}
    ingress = serve.deployment(Ingress).options(name="ingress", ray_actor_options={"num_cpus": 0})
    limits = {**{k: getattr(sc, k) for k in LIMITS}, "temperature": rl.temperature}
    return ingress.bind(handles, scorer["reward"], scorer["cost"], info, limits, gate)


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
