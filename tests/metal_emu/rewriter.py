"""Turns one preprocessed .metal file into C++ that the shim can compile.

The input is `clang++ -E` output made with empty stand-in <metal_*> headers:
project macros are expanded, MSL keywords and attributes are still text,
line markers point at the original files. The rewriter tokenizes it, walks
its declarations (namespace, class and function scopes) and edits tokens in
place, keeping every newline and line marker so that compiler errors still
name the original lines:

- kernels: each parameter's binding ([[buffer(i)]], [[threadgroup(i)]], a
  builtin, an optional function_constant guard) is recorded;
- explicit instantiations carrying [[host_name("...")]] are recorded, then
  removed (the generated entry wrapper instantiates the kernel instead);
- `threadgroup T x[N];` in a function body becomes a reference into the
  threadgroup arena (a macro could not tell it from a threadgroup pointer);
- function constants become runtime slots, program-scope constants computed
  from them are evaluated at use;
- declarations that differ only in their address spaces (overloads for
  device / threadgroup / thread) are kept once, since the shim erases
  address spaces;
- `1.5h` / `1.5bf` literals become casts, unsuffixed floating literals get an
  `f` (MSL has no double);
- attributes and the `kernel` keyword are dropped.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

ADDRESS_SPACES = {
    "device",
    "constant",
    "threadgroup",
    "thread",
    "threadgroup_imageblock",
    "ray_data",
    "object_data",
}
STANDARD_ATTRIBUTES = {
    "maybe_unused",
    "likely",
    "unlikely",
    "fallthrough",
    "nodiscard",
    "noreturn",
    "deprecated",
    "clang",
    "gnu",
}
BUILTINS = {
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threads_per_threadgroup",
    "dispatch_threads_per_threadgroup",
    "threadgroups_per_grid",
    "threads_per_grid",
    "thread_index_in_threadgroup",
    "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup",
    "threads_per_simdgroup",
    "thread_execution_width",
    "thread_index_in_quadgroup",
    "quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup",
    "dispatch_quadgroups_per_threadgroup",
}

_TOKEN = re.compile(
    r"""
    (?P<newline>\n)
  | (?P<space>[ \t\r\f\v]+|\\\n)
  | (?P<directive>(?<![^\n])[ \t]*\#[^\n]*)
  | (?P<string>(?:u8|[uUL])?R"(?P<delim>[^()\\\s]{0,16})\((?s:.*?)\)(?P=delim)"
      | (?:u8|[uUL])?"(?:\\.|[^"\\\n])*"
      | (?:u8|[uUL])?'(?:\\.|[^'\\\n])*')
  | (?P<number>\.?[0-9](?:[eEpP][+-]|'(?=\w)|[\w.])*)
  | (?P<ident>[A-Za-z_]\w*)
  | (?P<punct>::|->|\.\.\.|&&|\|\||<<|\+\+|--|[-+*/%&|^!=<>]=|.)
    """,
    re.X,
)
MAX_BINDINGS = 31  # [[buffer(i)]] / [[threadgroup(i)]] indices (runtime/abi.h)
MAX_FUNCTION_CONSTANTS = 256  # slots in shim/bind.h
OPENERS = {"(", "[", "{"}
# What may stand between a function's parameter list and its body.
_FUNCTION_SUFFIXES = {"const", "noexcept", "override", "final", "mutable"} | ADDRESS_SPACES
# What may follow a member function's address-space qualifier.
_AFTER_QUALIFIER = {
    "{",
    ":",
    ";",
    "const",
    "volatile",
    "noexcept",
    "->",
    "=",
    "&",
    "&&",
    "override",
    "final",
}
_DECIMAL_FLOAT = re.compile(r"(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][+-]?\d+)?")
_LINE_MARKER = re.compile(r'\s*#\s*(?:line\s+)?(\d+)\s+"((?:\\.|[^"\\])*)"')


class RewriteError(Exception):
    """The .metal source uses something the emulator cannot translate."""


@dataclass
class Param:
    name: str
    kind: str  # "buffer", "threadgroup" or "builtin"
    index: int = -1  # buffer / threadgroup index
    builtin: str = ""
    reference: bool = False  # a reference (constant T&) rather than a pointer
    guard: str = ""  # name of the function constant that makes it present


@dataclass
class Kernel:
    name: str  # qualified function name, e.g. ::affine_qmv_fast
    params: list[Param]
    template: bool
    host_name: str  # from a [[host_name]] on the definition itself, or ""
    location: str


@dataclass
class Instance:
    """One launchable kernel: a host name and the function it runs."""

    host_name: str
    function: str  # C++ expression naming the specialization
    location: str
    kernel: Kernel | None = None
    param_list: str = ""  # the explicit instantiation's parameter list, if it has one
    params: list[Param] = field(default_factory=list)


@dataclass
class FunctionConstant:
    name: str
    index: int
    type: str
    slot: int


@dataclass
class _Scope:
    kind: str  # "namespace" or "class"
    path: str  # namespace path, e.g. "::mlx::steel"
    key: object  # what identifies the scope for duplicate detection


class Rewriter:
    """Parses `source` on construction; `output()` gives the rewritten C++."""

    def __init__(self, source: str):
        self.source = source
        kinds, texts = [], []
        for m in _TOKEN.finditer(source):
            kinds.append(m.lastgroup if m.lastgroup != "delim" else "string")
            texts.append(m.group())
        self.raw_kinds = kinds
        self.raw_texts = texts
        self.sig = [i for i, k in enumerate(kinds) if k not in ("newline", "space", "directive")]
        self.t = [texts[i] for i in self.sig]
        self.kind = [kinds[i] for i in self.sig]
        self.out = list(self.t)  # phase 1: per-token edits
        self.replaced: dict[int, tuple[int, str]] = {}  # phase 2: start -> (end, text)
        self.kernels: dict[str, list[Kernel]] = {}
        self.instances: list[Instance] = []
        self.function_constants: dict[str, FunctionConstant] = {}
        self.derived: set[str] = set()
        self._seen: dict[object, set[tuple[str, ...]]] = {}
        self._lines: list[tuple[str, int]] | None = None
        self.pair = self._pair_brackets()
        self._edit_tokens()
        self._parse_scope(0, len(self.t), _Scope("namespace", "", ""))
        self._bind_instances()

    # -- tokens -----------------------------------------------------------

    def _pair_brackets(self) -> list[int]:
        pair = [-1] * len(self.t)
        stack: list[int] = []
        closer = {")": "(", "]": "[", "}": "{"}
        for i, x in enumerate(self.t):
            if x in OPENERS:
                stack.append(i)
            elif x in closer:
                if not stack or self.t[stack[-1]] != closer[x]:
                    raise RewriteError(f"{self.location(i)}: unbalanced '{x}'")
                j = stack.pop()
                pair[i], pair[j] = j, i
        if stack:
            raise RewriteError(f"{self.location(stack[-1])}: unbalanced '{self.t[stack[-1]]}'")
        return pair

    def _is_attribute(self, i: int) -> bool:
        return self.t[i] == "[" and i + 1 < len(self.t) and self.t[i + 1] == "["

    def _edit_tokens(self) -> None:
        """Edits that need no declaration context."""
        t, i = self.t, 0
        while i < len(t):
            if self._is_attribute(i) and self.pair[i + 1] + 1 == self.pair[i]:
                if t[i + 2] not in STANDARD_ATTRIBUTES:
                    self.out[i : self.pair[i] + 1] = [""] * (self.pair[i] + 1 - i)
                i = self.pair[i] + 1
                continue
            if self.kind[i] == "number":
                self.out[i] = _rewrite_number(t[i])
            elif t[i] == "coherent" and t[i + 1] == "(":  # coherent(device) T*: a memory-model hint
                self.out[i : self.pair[i + 1] + 1] = [""] * (self.pair[i + 1] + 1 - i)
            elif (
                t[i] in ADDRESS_SPACES
                and t[i - 1] in (")", "const", "volatile")
                and t[i + 1] in _AFTER_QUALIFIER
            ):
                # `f() const constant {`: an address-space qualifier of a member
                # function goes (the shim's `constant` -> `const` would make
                # constructors const).
                self.out[i] = ""
            elif t[i] == "static_cast" and t[i + 1] == "<":
                close = self._skip_angles(i + 1)
                if not any(x in ("*", "&", "&&", "(") for x in t[i + 2 : close]):
                    self.out[i] = "::metal::emu_static_cast"  # also converts half <-> bfloat
            i += 1

    def location(self, i: int) -> str:
        """`file:line` of significant token i, from the line markers."""
        if self._lines is None:
            self._lines = self._line_table()
        file, line = self._lines[min(i, len(self._lines) - 1)] if self._lines else ("<source>", 1)
        return f"{file}:{line}"

    def _line_table(self) -> list[tuple[str, int]]:
        table, file, line = [], "<source>", 1
        for kind, text in zip(self.raw_kinds, self.raw_texts, strict=True):
            if kind == "newline":
                line += 1
            elif kind == "directive":
                m = _LINE_MARKER.match(text)
                if m:  # `# N "file"`: the next line is line N of file
                    file, line = m.group(2), int(m.group(1)) - 1
            elif kind != "space":
                table.append((file, line))
        return table

    def _text(self, start: int, end: int) -> str:
        """Edited text of significant tokens [start, end) on one line, with the
        original spacing (so that `>>=` stays one operator)."""
        if start >= end:
            return ""
        parts, s = [], start
        for raw in range(self.sig[start], self.sig[end - 1] + 1):
            if raw == self.sig[s]:
                parts.append(self.out[s])
                s += 1
            elif self.raw_kinds[raw] in ("space", "newline"):
                parts.append(" ")
        return "".join(parts).strip()

    def _replace(self, start: int, end: int, text: str) -> None:
        """Replaces significant tokens [start, end] (inclusive) by `text`."""
        self.replaced[start] = (end, text)

    def _skip_angles(self, i: int) -> int:
        """Index of the '>' closing the '<' at i. A '<' after a name opens
        template arguments; after `)` or a literal it compares
        (`enable_if_t<sizeof(T) < 8, bool>`)."""
        depth = 0
        while i < len(self.t):
            x = self.t[i]
            if x in OPENERS:
                i = self.pair[i]
            elif x == "<" and self.kind[i - 1] == "ident":
                depth += 1
            elif x == ">":
                depth -= 1
                if depth == 0:
                    return i
            elif x == ";":
                break
            i += 1
        raise RewriteError(f"{self.location(i)}: unbalanced '<'")

    def _split_top(self, start: int, end: int, sep: str = ",") -> list[tuple[int, int]]:
        """[start, end) split at top-level `sep` (outside brackets and template args)."""
        parts, depth, begin, i = [], 0, start, start
        while i < end:
            x = self.t[i]
            if x in OPENERS:
                i = self.pair[i]
            elif x == "<" and i > start and self.kind[i - 1] == "ident":
                depth += 1
            elif x == ">" and depth > 0:
                depth -= 1
            elif x == sep and depth == 0:
                parts.append((begin, i))
                begin = i + 1
            i += 1
        if begin < end:
            parts.append((begin, end))
        return parts

    def _attributes(self, start: int, end: int) -> list[tuple[str, str]]:
        """(name, argument text) of every attribute in [start, end)."""
        found, i = [], start
        while i < end:
            if self._is_attribute(i):
                inner = self.pair[i + 1]
                for a, b in self._split_top(i + 2, inner):
                    name = self.t[a]
                    arg = ""
                    if a + 1 < b and self.t[a + 1] == "(":
                        arg = "".join(self.t[a + 2 : self.pair[a + 1]])
                    found.append((name, arg))
                i = self.pair[i] + 1
            elif self.t[i] in ("(", "{"):
                i = self.pair[i] + 1
            else:
                i += 1
        return found

    def _head_start(self, start: int, end: int) -> int:
        """First token after `template <...>` prefixes and leading attributes."""
        h = start
        while h < end:
            if self.t[h] == "template" and h + 1 < end and self.t[h + 1] == "<":
                h = self._skip_angles(h + 1) + 1
            elif self._is_attribute(h):
                h = self.pair[h] + 1
            else:
                break
        return h

    def _first_top(self, start: int, end: int, what: str) -> int:
        i = start
        while i < end:
            if self.t[i] == what:
                return i
            i = self.pair[i] + 1 if self.t[i] in OPENERS else i + 1
        return -1

    # -- scopes -------------------------------------------------------------

    def _parse_scope(self, i: int, end: int, scope: _Scope) -> None:
        start = i
        while i < end:
            x = self.t[i]
            if x == ";":
                self._item(scope, start, i)
                i += 1
                start = i
            elif x in ("public", "private", "protected") and i == start and self.t[i + 1] == ":":
                i += 2
                start = i
            elif x in ("(", "["):
                i = self.pair[i] + 1
            elif x == "{":
                close = self.pair[i]
                kind = self._classify(start, i)
                if kind == "namespace":
                    h = self._head_start(start, i)
                    name = (
                        self.t[i - 1]
                        if self.kind[i - 1] == "ident" and self.t[h] != "extern"
                        else ""
                    )
                    path = f"{scope.path}::{name}" if name else scope.path
                    self._parse_scope(i + 1, close, _Scope("namespace", path, path))
                    start = close + 1
                elif kind == "class":
                    self._parse_scope(i + 1, close, _Scope("class", scope.path, ("class", i)))
                elif kind == "function":
                    self._function(scope, start, i, close)
                    self._item(scope, start, close)
                    start = close + 1
                i = close + 1
            else:
                i += 1

    def _classify(self, start: int, brace: int) -> str:
        """What the '{' at `brace` opens, from the declaration head before it."""
        h = self._head_start(start, brace)
        t = self.t
        if t[h] == "namespace" or t[h : h + 2] == ["inline", "namespace"]:
            return "namespace"
        if t[h] == "extern" and self.kind[h + 1] == "string" and h + 2 == brace:
            return "namespace"
        i, paren, close_paren, assign = h, False, -1, False
        while i < brace:
            x = t[i]
            if x in ("struct", "class", "union", "enum") and not paren:
                return "class" if x != "enum" else "enum"
            if x == "(":
                paren = True
                close_paren = self.pair[i]
                i = close_paren + 1
                continue
            if x in ("[", "{"):
                i = self.pair[i] + 1
                continue
            if x == "=" and t[i - 1] != "operator":
                assign = True
            i += 1
        if assign or not paren:
            return "init"
        # `Ctor() : member{value} {`: a brace after a name or template-id in
        # a constructor's initializer list initializes a member.
        in_initializers = self._first_top(close_paren, brace, ":") >= 0
        after_name = (self.kind[brace - 1] == "ident" or t[brace - 1] == ">") and t[
            brace - 1
        ] not in _FUNCTION_SUFFIXES
        return "init" if in_initializers and after_name else "function"

    def _item(self, scope: _Scope, start: int, end: int) -> None:
        """A complete declaration [start, end] at namespace or class scope."""
        if start > end:
            return
        if scope.kind == "namespace":
            if self.t[start] == "template" and start + 1 <= end and self.t[start + 1] != "<":
                if self._instantiation(start, end):
                    return
            attrs = self._attributes(start, end)
            if any(name == "function_constant" for name, _ in attrs):
                self._function_constant(start, end, attrs)
                return
            self._derived_constant(start, end)
        self._deduplicate(scope, start, end)

    def _deduplicate(self, scope: _Scope, start: int, end: int) -> None:
        """Drops a declaration equal to an earlier one once address spaces are
        erased (`constant` reads as `const`, as in the shim)."""
        key, spaces, i = [], False, start
        while i <= end:
            x = self.out[i]
            if self._is_attribute(i):
                i = self.pair[i] + 1
                continue
            if self.t[i] in ADDRESS_SPACES:
                spaces = True
                x = "const" if x == "constant" else ""
            if x and not (x == "const" and key and key[-1] == "const"):
                key.append(x)
            i += 1
        if not spaces:
            return
        seen = self._seen.setdefault(scope.key, set())
        if tuple(key) in seen:
            self._replace(start, end, "")
        else:
            seen.add(tuple(key))

    # -- functions and kernels -----------------------------------------------

    def _function(self, scope: _Scope, start: int, brace: int, close: int) -> None:
        h = self._head_start(start, brace)
        is_kernel = any(name == "kernel" for name, _ in self._attributes(start, brace))
        for i in range(h, brace):
            if self.t[i] == "kernel" and self.kind[i + 1] == "ident":
                is_kernel = True
                self.out[i] = ""
        if is_kernel and scope.kind == "namespace":
            self._kernel(scope, start, h, brace)
        self._threadgroup_variables(brace + 1, close)

    def _kernel(self, scope: _Scope, start: int, h: int, brace: int) -> None:
        open_paren = self._first_top(h, brace, "(")
        name = self.t[open_paren - 1]
        host = [arg for attr, arg in self._attributes(start, brace) if attr == "host_name"]
        kernel = Kernel(
            name=f"{scope.path}::{name}",
            params=self._params(open_paren, name),
            template=self.t[start] == "template",
            host_name=_string_value(host[0]) if host else "",
            location=self.location(start),
        )
        self.kernels.setdefault(name, []).append(kernel)

    def _params(self, open_paren: int, kernel: str) -> list[Param]:
        params = []
        next_index = {"buffer": 0, "threadgroup": 0}  # MSL's implicit numbering
        for a, b in self._split_top(open_paren + 1, self.pair[open_paren]):
            first_attr = next((i for i in range(a, b) if self._is_attribute(i)), b)
            decl = [x for x in self.t[a:first_attr] if x != "="]
            name = next((x for x in reversed(decl) if _is_identifier(x)), "")
            param = Param(name=name, kind="")
            for attr, arg in self._attributes(first_attr, b):
                if attr in ("buffer", "threadgroup"):
                    param.kind, param.index = attr, _int_value(arg, self.location(a))
                    if not 0 <= param.index < MAX_BINDINGS:
                        raise RewriteError(
                            f"{self.location(a)}: kernel '{kernel}' parameter '{name}': "
                            f"index {param.index} is not in 0..{MAX_BINDINGS - 1}"
                        )
                elif attr in BUILTINS:
                    param.kind, param.builtin = "builtin", attr
                elif attr == "function_constant":
                    param.guard = arg
                else:
                    raise RewriteError(
                        f"{self.location(a)}: kernel '{kernel}' parameter '{name}': "
                        f"[[{attr}]] is not supported by the emulator"
                    )
            refs = [x for x in decl if x in ("*", "&", "&&", "[")]  # T x[2] is a pointer
            param.reference = bool(refs) and refs[-1] not in ("*", "[")
            if not param.kind:
                if not refs:
                    raise RewriteError(
                        f"{self.location(a)}: kernel '{kernel}' parameter '{name}' is neither "
                        "a buffer nor a builtin"
                    )
                param.kind = "threadgroup" if "threadgroup" in decl else "buffer"
                param.index = next_index[param.kind]
            if param.kind != "builtin":
                next_index[param.kind] = param.index + 1
            params.append(param)
        return params

    def _threadgroup_variables(self, i: int, end: int) -> None:
        """Rewrites `threadgroup T x[N];` statements of a function body."""
        at_statement = True
        while i < end:
            x = self.t[i]
            if at_statement and x == "threadgroup":
                semi = self._first_top(i, end, ";")
                self._threadgroup_variable(i, semi)
                i = semi + 1
                continue
            if x in ("(", "["):
                i = self.pair[i] + 1
                at_statement = False
                continue
            at_statement = x in (";", "{", "}")
            i += 1

    def _threadgroup_variable(self, start: int, semi: int) -> None:
        depth, bracket, i = 0, -1, start + 1
        while i < semi:
            x = self.t[i]
            if x == "<":
                depth += 1
            elif x == ">" and depth:
                depth -= 1
            elif depth == 0 and x in ("*", "&", "&&", "=", "("):
                return  # a pointer or reference into threadgroup memory
            elif depth == 0 and x == "[":
                bracket = i if bracket < 0 else bracket
                i = self.pair[i]
            i += 1
        if len(self._split_top(start + 1, semi)) > 1:
            raise RewriteError(
                f"{self.location(start)}: declare one threadgroup variable per statement"
            )
        name_at = (bracket if bracket >= 0 else semi) - 1
        array_type = self._text(start + 1, name_at) + " " + self._text(name_at + 1, semi)
        name = self.t[name_at]
        self._replace(
            start,
            semi,
            f"emu_threadgroup_ref<{array_type}> {name} = emu_threadgroup_var<{array_type}>();",
        )

    # -- instantiations and function constants ---------------------------------

    def _instantiation(self, start: int, end: int) -> bool:
        """`template [[host_name("n")]] [[kernel]] decltype(f<A>) f<A>;`, or the
        same with a parameter list instead of decltype."""
        host = [arg for name, arg in self._attributes(start, end) if name == "host_name"]
        if not host:
            return False
        i = start + 1
        while self._is_attribute(i) or self.t[i] == "kernel":
            i = self.pair[i] + 1 if self.t[i] == "[" else i + 1
        open_paren = self._first_top(i, end, "(")
        if self.t[i] == "decltype":
            function = self._text(self.pair[i + 1] + 1, end)
            param_list = ""
        else:
            name_end = open_paren
            j = open_paren - 1
            if self.t[j] == ">":
                depth = 0
                while True:
                    depth += {">": 1, "<": -1}.get(self.t[j], 0)
                    if depth == 0:
                        break
                    j -= 1
                j -= 1
            while j - 2 >= i and self.t[j - 1] == "::":
                j -= 2
            function = self._text(j, name_end)
            param_list = self._text(open_paren + 1, self.pair[open_paren])
        self.instances.append(
            Instance(
                host_name=_string_value(host[0]),
                function=function,
                location=self.location(start),
                param_list=param_list,
                params=self._params(open_paren, function) if param_list else [],
            )
        )
        self._replace(start, end, "")
        return True

    def _declared_name(self, start: int, end: int) -> tuple[int, str]:
        """Index and type text of the variable declared by [start, end)."""
        name_at = end - 1
        while not _is_identifier(self.t[name_at]):
            name_at -= 1
        qualifiers = {"static", "constant", "constexpr", "const", "inline", "extern"}
        type_text = " ".join(
            x
            for x in self.out[start:name_at]
            if x and x not in qualifiers and x not in ADDRESS_SPACES
        )
        return name_at, type_text

    def _function_constant(self, start: int, end: int, attrs: list[tuple[str, str]]) -> None:
        index = _int_value(
            next(arg for name, arg in attrs if name == "function_constant"), self.location(start)
        )
        first_attr = next(i for i in range(start, end) if self._is_attribute(i))
        name_at, type_text = self._declared_name(start, first_attr)
        name = self.t[name_at]
        slot = len(self.function_constants)
        if slot == MAX_FUNCTION_CONSTANTS:
            raise RewriteError(f"{self.location(start)}: more than {slot} function constants")
        self.function_constants[name] = FunctionConstant(name, index, type_text, slot)
        self._replace(
            start,
            end,
            f'static const emu_function_constant<{type_text}, {slot}> {name}{{"{name}", {index}}};',
        )

    def _derived_constant(self, start: int, end: int) -> None:
        """`constant bool x = !has_mask;`: evaluated at each use, not at load."""
        if self.t[end] != ";" or self.t[start] == "template":
            return
        eq = self._first_top(start, end, "=")
        if (
            eq < 0
            or "constant" not in self.t[start:eq]
            or any(x in OPENERS for x in self.t[start:eq])
        ):
            return
        known = self.function_constants.keys() | self.derived
        if not any(x in known for x in self.t[eq + 1 : end]):
            return
        name_at, type_text = self._declared_name(start, eq)
        name = self.t[name_at]
        self.derived.add(name)
        value = self._text(eq + 1, end)
        self._replace(
            start,
            end,
            f"static const emu_derived_constant<{type_text}> {name}"
            f"{{+[]() -> {type_text} {{ return ({value}); }}}};",
        )

    def _bind_instances(self) -> None:
        for inst in self.instances:
            base = re.sub(r"<.*", "", inst.function).split("::")[-1].strip()
            candidates = self.kernels.get(base, [])
            if not candidates:
                raise RewriteError(
                    f"{inst.location}: host_name '{inst.host_name}': "
                    f"'{base}' is not a [[kernel]] function"
                )
            # Overloads are fine when their arguments bind alike (C++ picks
            # the specialization; the bindings are all we take from here).
            bindings = {
                tuple((p.kind, p.index, p.builtin, p.reference, p.guard) for p in k.params)
                for k in candidates
            }
            if len(bindings) > 1 and not inst.params:
                raise RewriteError(
                    f"{inst.location}: host_name '{inst.host_name}': "
                    f"the overloads of '{base}' bind "
                    "their arguments differently; instantiate with an explicit parameter list"
                )
            inst.kernel = candidates[0]
            if not inst.params:
                inst.params = inst.kernel.params
        for overloads in self.kernels.values():
            for kernel in overloads:
                if not kernel.template:
                    self.instances.append(
                        Instance(
                            host_name=kernel.host_name or kernel.name.split("::")[-1],
                            function=kernel.name,
                            location=kernel.location,
                            kernel=kernel,
                            params=kernel.params,
                        )
                    )

    # -- output -----------------------------------------------------------------

    def output(self) -> str:
        parts, raw = [], 0
        texts, kinds = self.raw_texts, self.raw_kinds
        n = len(texts)
        sig_at = {r: s for s, r in enumerate(self.sig)}
        while raw < n:
            kind = kinds[raw]
            if kind in ("newline", "space", "directive"):
                parts.append(texts[raw])
                raw += 1
                continue
            s = sig_at[raw]
            if s in self.replaced:
                end, text = self.replaced[s]
                parts.append(text)
                stop = self.sig[end]
                raw += 1
                while raw <= stop:  # keep line structure inside the replaced span
                    if kinds[raw] in ("newline", "directive"):
                        parts.append(texts[raw])
                    raw += 1
                continue
            parts.append(self.out[s])
            raw += 1
        return "".join(parts)


def _rewrite_number(x: str) -> str:
    low = x.lower()
    if low.startswith("0x"):
        return x
    if low.endswith("bf"):
        return f"((bfloat){x[:-2]})"
    if low.endswith("h"):
        return f"((half){x[:-1]})"
    if _DECIMAL_FLOAT.fullmatch(x):
        return x + "f"
    return x


def _is_identifier(x: str) -> bool:
    return x[:1].isalpha() or x[:1] == "_"


def _string_value(text: str) -> str:
    """Concatenation of the adjacent string literals in `text`."""
    return "".join(ast.literal_eval(s) for s in re.findall(r'"(?:\\.|[^"\\])*"', text))


def _int_value(text: str, where: str) -> int:
    if not re.fullmatch(r"[0-9xXa-fA-F+\-*() uUlL]+", text or "x"):
        raise RewriteError(f"{where}: index '{text}' is not an integer constant")
    text = re.sub(r"(?<=[0-9a-fA-F])[uUlL]+", "", text)
    text = re.sub(r"\b0([0-7]+)\b", r"0o\1", text)  # C octal, e.g. function_constant(01)
    return int(eval(text, {"__builtins__": {}}))
