"""Debug log calls of py-libp2p's hot paths made lazy: evaluated only when DEBUG is on.

py-libp2p 0.8.1 writes its debug logs as ``logger.debug(f"...")``: the f-string (peer ids, flag
lists, stream states) is built on every frame and every read even though DEBUG is off, the
logging call only then discarding it. In the gossip bench that was about 7 % of the CPU of the
yamux/Noise layer per RPC (measured in-process, 2,000 RPCs of 8 KB).

:func:`guard_debug_logs` recompiles a module's functions from its source with each such statement
``<name>.debug(...)`` wrapped in ``if <name>.isEnabledFor(logging.DEBUG):`` and swaps the new code
into the existing function objects (so every reference already taken, bound methods included,
runs it). Nothing else changes: with DEBUG on, the same records are logged, with the same
arguments; only a debug call whose arguments raise no longer raises with DEBUG off. A function
whose recompiled code cannot be matched unambiguously (by qualified name and free variables) is
left as it is.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import types
from collections.abc import Iterator
from typing import Any

# The modules of py-libp2p 0.8.1 a pubsub RPC passes through (TCP, Noise, yamux, streams, pubsub).
HOT_MODULES = (
    "libp2p.io.trio",
    "libp2p.io.msgio",
    "libp2p.security.noise.io",
    "libp2p.security.secure_session",
    "libp2p.stream_muxer.yamux.yamux",
    "libp2p.network.stream.net_stream",
    "libp2p.network.connection.swarm_connection",
    "libp2p.pubsub.pubsub",
    "libp2p.pubsub.gossipsub",
    "libp2p.pubsub.rpc_queue",
    "libp2p.pubsub.mcache",
)

_done: dict[str, int] = {}


class _GuardDebug(ast.NodeTransformer):
    """``x.debug(...)`` as a statement -> ``if x.isEnabledFor(DEBUG): x.debug(...)``, for ``x`` in ``loggers``.

    Only names of module-level ``logging.Logger`` objects: ``logging.debug(...)`` (the module) has no
    ``isEnabledFor``, and calling it there would raise.
    """

    def __init__(self, loggers: set[str]) -> None:
        self.loggers = loggers

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        call = node.value
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "debug"
            and isinstance(call.func.value, ast.Name)
            and call.func.value.id in self.loggers
        ):
            enabled = ast.Call(
                func=ast.Attribute(
                    value=ast.Name(id=call.func.value.id, ctx=ast.Load()), attr="isEnabledFor", ctx=ast.Load()
                ),
                args=[ast.Constant(logging.DEBUG)],
                keywords=[],
            )
            return ast.copy_location(ast.If(test=enabled, body=[node], orelse=[]), node)
        return node


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield const
            yield from _code_objects(const)


def _guards(code: types.CodeType) -> int:
    """How many of ``code`` and the code objects nested in it look up ``isEnabledFor``."""
    return sum(c.co_names.count("isEnabledFor") for c in (code, *_code_objects(code)))


def _module_functions(module: types.ModuleType) -> Iterator[types.FunctionType]:
    """Functions defined in ``module``: top level and in its classes (methods, static, class, properties)."""
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> Iterator[types.FunctionType]:
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, staticmethod | classmethod):
            obj = obj.__func__
        if isinstance(obj, property):
            for accessor in (obj.fget, obj.fset, obj.fdel):
                if accessor is not None:
                    yield from visit(accessor, depth + 1)
        elif isinstance(obj, types.FunctionType):
            if obj.__module__ == module.__name__:
                yield obj
        elif isinstance(obj, type) and obj.__module__ == module.__name__:
            for member in vars(obj).values():
                yield from visit(member, depth + 1)

    for value in list(vars(module).values()):
        yield from visit(value, 0)


def guard_debug_logs(module: types.ModuleType) -> int:
    """Make ``module``'s debug log statements lazy (see the module docstring); returns how many functions changed."""
    loggers = {name for name, value in vars(module).items() if isinstance(value, logging.Logger)}
    tree = _GuardDebug(loggers).visit(ast.parse(inspect.getsource(module)))
    ast.fix_missing_locations(tree)
    by_name: dict[str, list[types.CodeType]] = {}
    for code in _code_objects(compile(tree, inspect.getsourcefile(module) or module.__name__, "exec")):
        by_name.setdefault(code.co_qualname, []).append(code)
    changed = 0
    for function in _module_functions(module):
        candidates = by_name.get(function.__code__.co_qualname, [])
        if len(candidates) != 1 or candidates[0].co_freevars != function.__code__.co_freevars:
            continue
        if _guards(candidates[0]) > _guards(function.__code__):  # nested code (a closure's body) counts
            function.__code__ = candidates[0]
            changed += 1
    return changed


def guard_hot_debug_logs() -> dict[str, int]:
    """:func:`guard_debug_logs` on each of ``HOT_MODULES`` once per process; module -> functions changed."""
    for name in HOT_MODULES:
        if name not in _done:
            _done[name] = guard_debug_logs(importlib.import_module(name))
    return dict(_done)
