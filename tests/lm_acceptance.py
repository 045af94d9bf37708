"""mlx_ext.patch against mlx-lm's own model zoo.

Every config of mlx-lm's ``tests/test_models.py::test_all_models`` is built
with random weights in float32, quantized 4-bit with group size 64 (or in
``--mode`` mxfp4 / nvfp4 / mxfp8; honouring the model's ``quant_predicate``), and run before and after ``mlx_ext.patch``:
the logits of a prefill and of a cached decode step must agree within 1e-3
relative (max |difference| / max |logit|), and a short greedy
``mlx_lm.generate.generate_step`` must run on the patched model. The prefill
and decode run twice: with mlx-lm's plain cache, and with its caches turned
into ``QuantizedKVCache`` (4-bit, group 32) from the start. That second run
routes the attention alone (``mlx_ext.lm_attention.route``), so that both
models quantize the same keys; even so a key of layer 2 depends on layer 1's
attention, whose 1e-6 rounding differences can move it across a rounding
boundary, and the cache then holds another code: a difference of the
quantization, not of the attention, and it grows with depth (nanochat, 20
layers: 1.3e-3 relative at 4 bits, 1.7e-3 at 8). The quantized rows are held
to 1e-2; tests/test_lm_patch.py holds 2-layer models to 1e-3 at 4 and 8 bits.
Each line also says
how many of the routed attention calls ran through mlx_ext (the others, e.g.
MLA's unequal key and value head dims, went to mlx-lm's function).

    python tests/lm_acceptance.py PATH/TO/mlx-lm/tests/test_models.py
    python tests/lm_acceptance.py PATH/TO/test_models.py --model-tests --moe-only

The second line takes the per-model tests' configs too (most MoE models, e.g.
mixtral, qwen2_moe, qwen3_moe, deepseek_v2/v3, gpt_oss, are tested there) and
keeps the architectures built on mlx-lm's switch layers (mixtures of
experts): each must be patched with no ``QuantizedSwitchLinear`` left.

mlx-lm's tests are not in its wheel: clone github.com/ml-explore/mlx-lm at the
installed version. tests/test_lm_patch.py runs ``check_config`` on a
representative subset in the default test suite.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

import mlx_ext
from mlx_ext import lm_attention

RTOL = 1e-3
KV_BITS, KV_GROUP_SIZE = 4, 32
QUANTIZED_KV_RTOL = 1e-2  # see the docstring: code flips, not attention
PROMPT = [[0, 1, 2, 3, 4, 5, 6, 7]]
GENERATED_TOKENS = 8


@dataclass
class Result:
    model_type: str
    status: str  # "pass", "fail" or "skip"
    prefill_rel: float = float("nan")
    decode_rel: float = float("nan")
    quantized_kv_rel: float = float("nan")  # the worse of prefill and decode, or nan: no run
    attention_calls: str = ""
    tokens_agree: bool | None = None
    patch_report: str = ""
    reason: str = ""


# group_size and bits of each mode mlx_lm.convert --q-mode writes.
MODE_PARAMS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


def quantize(model: nn.Module, mode: str = "affine") -> None:
    """mlx_lm.utils.quantize_model's rule (the model's quant_predicate; layers
    whose input is not a multiple of group_size stay float), with parameters
    passed as a dict so that layers whose ``to_quantized`` takes no ``mode``
    (afm7's FusedLinear) quantize too (in affine mode)."""
    predicate = getattr(model, "quant_predicate", None)
    group_size, bits = MODE_PARAMS[mode]

    def layer_params(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        chosen = predicate(path, module) if predicate is not None else True
        params = {"group_size": group_size, "bits": bits}
        if mode != "affine":
            params["mode"] = mode
        return params if chosen is True else chosen

    nn.quantize(model, class_predicate=layer_params)


def build_quantized(config: dict, mode: str = "affine") -> nn.Module:
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(0)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    quantize(model, mode)
    mx.eval(model.parameters())
    return model


def prefill_and_decode(model: nn.Module, kv_bits: int | None = None) -> tuple[mx.array, mx.array]:
    """Logits of the prompt, then of one cached decode step. With `kv_bits`,
    the model's KV caches are quantized (mlx-lm's QuantizedKVCache) before
    the prompt, as ``generate_step(kv_bits=, quantized_kv_start=0)`` does."""
    from mlx_lm.generate import maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    maybe_quantize_kv_cache(cache, 0, KV_GROUP_SIZE, kv_bits)
    prefill = model(mx.array(PROMPT), cache=cache)
    decode = model(mx.argmax(prefill[:, -1:], axis=-1), cache=cache)
    mx.eval(prefill, decode)
    return prefill, decode


def greedy_tokens(model: nn.Module) -> list[int]:
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(PROMPT[0]), model, max_tokens=GENERATED_TOKENS)
    return [token for token, _ in steps]


def has_switch_layers(config: dict) -> bool:
    """Whether `config`'s architecture builds its experts from mlx-lm's
    switch layers (read from its module's source: building every model of the
    per-model tests, some of them large, only to look would take long)."""
    try:
        arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    except (Exception, SystemExit):  # mlx-lm's olmo exits when ai2-olmo is missing
        return False
    # The module and the mlx-lm model modules it builds on (kimi_vl: deepseek_v3, ...).
    names = {arch.__name__} | {
        v.__name__ if inspect.ismodule(v) else getattr(v, "__module__", "") for v in vars(arch).values()
    }
    return any("switch_layers" in inspect.getsource(sys.modules[n])
               for n in names if n.startswith("mlx_lm.models.") and n in sys.modules)


def relative_error(got: mx.array, want: mx.array) -> float:
    return (mx.abs(got - want).max() / mx.abs(want).max()).item()


def check_config(config: dict, mode: str = "affine", kv_bits: int = KV_BITS) -> Result:
    model_type = config["model_type"]
    try:
        model = build_quantized(config, mode)
        want_prefill, want_decode = prefill_and_decode(model)
        want_tokens = greedy_tokens(model)
    except Exception as e:  # the unpatched quantized model: mlx-lm's own limits
        return Result(model_type, "skip", reason=f"mlx-lm's quantized model fails: {e!r}"[:200])
    try:  # mlx-lm's own quantized cache may refuse the model (head dims, cache kinds)
        want_quantized = prefill_and_decode(model, kv_bits)
    except Exception:
        want_quantized = None
    lm_attention.calls.clear()
    try:
        quantized = None
        if want_quantized is not None:  # attention alone routed: see the module's docstring
            lm_attention.route(model)
            quantized = prefill_and_decode(model, kv_bits)
            lm_attention.unroute(model)
        report = mlx_ext.patch(model)
        prefill, decode = prefill_and_decode(model)
        tokens = greedy_tokens(model)
    except Exception as e:
        return Result(model_type, "fail", reason=f"patched model fails: {e!r}"[:200])
    result = Result(
        model_type,
        "pass",
        prefill_rel=relative_error(prefill, want_prefill),
        decode_rel=relative_error(decode, want_decode),
        tokens_agree=tokens == want_tokens,
        patch_report=str(report),
        attention_calls=f"{lm_attention.calls['mlx_ext']} of {lm_attention.calls.total()}",
    )
    if quantized is not None:
        result.quantized_kv_rel = max(map(relative_error, quantized, want_quantized))
    if "QuantizedSwitchLinear" in report.left:  # an affine MoE layer mlx_ext did not take
        result.status = "fail"
        result.reason = "QuantizedSwitchLinear left unpatched"
    if (
        max(result.prefill_rel, result.decode_rel) > RTOL
        or result.quantized_kv_rel > QUANTIZED_KV_RTOL  # False for NaN: no quantized run
        or len(tokens) != GENERATED_TOKENS
    ):
        result.status = "fail"
    return result


def configs_of_test_all_models(test_models_py: Path) -> list[dict]:
    """The literal config list of test_all_models, read without importing the file."""
    tree = ast.parse(test_models_py.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "test_all_models":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "test_configs":
                    # Literals plus a little arithmetic (e.g. 2 * [...]): no names, no calls.
                    code = compile(ast.Expression(stmt.value), str(test_models_py), "eval")
                    return eval(code, {"__builtins__": {}})
    raise ValueError(f"no test_all_models config list in {test_models_py}")


def configs_of_model_tests(test_models_py: Path) -> list[dict]:
    """The configs of the per-model tests (``test_mixtral``, ``test_qwen3_moe``,
    ``test_deepseek_v2``, ...: most MoE models are tested there, not in
    test_all_models): each ``<arch>.ModelArgs(model_type=..., ...)`` call whose
    keyword values are all literals, as a dict."""
    configs = []
    for node in ast.walk(ast.parse(test_models_py.read_text())):
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
            continue
        for call in ast.walk(node):
            if not (isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "ModelArgs"
                    and not call.args):
                continue
            try:
                config = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
            except (ValueError, TypeError, SyntaxError):
                continue  # a value computed from names: not a literal config
            if "model_type" in config and config not in configs:
                configs.append(config)
    return configs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test_models_py", type=Path, help="mlx-lm's tests/test_models.py")
    parser.add_argument("--mode", choices=list(MODE_PARAMS), default="affine",
                        help="quantization mode of the models (mlx_lm.convert --q-mode)")
    parser.add_argument("--model-tests", action="store_true",
                        help="also the literal configs of the per-model tests (test_mixtral, ...)")
    parser.add_argument("--moe-only", action="store_true",
                        help="only the configs whose architecture uses mlx-lm's switch layers (MoE)")
    args = parser.parse_args()
    configs = configs_of_test_all_models(args.test_models_py)
    if args.model_tests:
        configs += configs_of_model_tests(args.test_models_py)
    if args.moe_only:
        configs = [c for c in configs if has_switch_layers(c)]
    results = []
    for config in configs:
        result = check_config(config, args.mode)
        results.append(result)
        print(
            f"{result.status:4s} {result.model_type:22s} prefill {result.prefill_rel:.1e} "
            f"decode {result.decode_rel:.1e} quantized KV {result.quantized_kv_rel:.1e} "
            f"tokens agree {result.tokens_agree} attention through mlx_ext "
            f"{result.attention_calls}  {result.patch_report}{result.reason}",
            flush=True,
        )
    ran = [r for r in results if r.status != "skip"]
    passed = [r for r in ran if r.status == "pass"]
    worst = max((max(r.prefill_rel, r.decode_rel) for r in ran), default=float("nan"))
    quantized = [r.quantized_kv_rel for r in ran if r.quantized_kv_rel == r.quantized_kv_rel]
    print(
        f"\n{len(results)} configs: {len(ran)} ran, {len(passed)} passed, "
        f"{len(results) - len(ran)} skipped; max relative error {worst:.2e} (tolerance {RTOL}); "
        f"quantized KV cache: {len(quantized)} ran, max relative error "
        f"{max(quantized, default=float('nan')):.2e} (tolerance {QUANTIZED_KV_RTOL})"
    )
    return 0 if len(passed) == len(ran) else 1


if __name__ == "__main__":
    sys.exit(main())
