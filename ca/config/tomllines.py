"""Where each key of a TOML document is: line numbers for error messages.

``tomllib`` parses but says nothing about positions, and no TOML parser we ship
does. So after ``tomllib`` has accepted a document (it is then known to be valid
TOML), this module scans the text once more, only far enough to know, for every
key, the line it is written on:

- table headers ``[a.b]`` and array-of-tables headers ``[[a.b]]``, counting the
  elements of each array of tables (``("policy", "rule", 2)`` is the third
  ``[[policy.rule]]``, nested arrays counted per element of their parent);
- ``key = value`` lines, dotted and quoted keys included, relative to the table
  they are in;
- the elements of an array value (``("policy", "rule", 0, "allow_paths", 1)``),
  which may be spread over several lines;
- strings (basic, literal, multi-line) and comments are skipped as such, so a
  ``#``, ``[`` or ``=`` inside them is never taken for syntax.

Keys of inline tables are not recorded: :meth:`KeyLines.line` falls back to the
nearest recorded ancestor (the inline table's own key), which is on the same line
in TOML 1.0 anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

PathPart = str | int
KeyPath = tuple[PathPart, ...]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class KeyLines:
    """Line numbers (1-based) of the keys, tables and array elements of a document."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line = 1
        self.lines: dict[KeyPath, int] = {}
        # Array-of-tables element counts, by the resolved path of the array.
        self._aot: dict[KeyPath, int] = {}
        self._scan()

    def line(self, path: Sequence[PathPart]) -> int | None:
        """The line of ``path``, else of its nearest recorded ancestor; None if none."""
        key = tuple(path)
        while key:
            found = self.lines.get(key)
            if found is not None:
                return found
            key = key[:-1]
        return None

    # ---- the scanner -------------------------------------------------------------

    def _peek(self, offset: int = 0) -> str:
        i = self._pos + offset
        return self._text[i] if i < len(self._text) else ""

    def _advance(self, n: int = 1) -> None:
        for _ in range(n):
            if self._pos < len(self._text):
                if self._text[self._pos] == "\n":
                    self._line += 1
                self._pos += 1

    def _skip_blank(self, *, newlines: bool) -> None:
        """Skip spaces and tabs (and newlines and comments when ``newlines``)."""
        while self._pos < len(self._text):
            c = self._peek()
            if c in " \t\r":
                self._advance()
            elif newlines and c == "\n":
                self._advance()
            elif newlines and c == "#":
                self._skip_comment()
            else:
                return

    def _skip_comment(self) -> None:
        while self._pos < len(self._text) and self._peek() != "\n":
            self._advance()

    def _string(self) -> str:
        """Read a string at the position (any of the four kinds); its value, roughly.

        Escapes are not decoded (only ``\\"`` is kept from ending the string): the
        value is used to name keys, and quoted keys with escapes are rare enough
        that an approximate name only costs a less precise line.
        """
        quote = self._peek()
        triple = self._peek(1) == quote and self._peek(2) == quote
        if triple:
            self._advance(3)
            start = self._pos
            while self._pos < len(self._text):
                if quote == '"' and self._peek() == "\\":
                    self._advance(2)
                    continue
                if self._peek() == quote and self._peek(1) == quote and self._peek(2) == quote:
                    # Up to two more quotes may belong to the content ('''a''''').
                    while self._peek(3) == quote:
                        self._advance()
                    value = self._text[start:self._pos]
                    self._advance(3)
                    return value
                self._advance()
            return self._text[start:]
        self._advance()
        start = self._pos
        while self._pos < len(self._text) and self._peek() not in (quote, "\n"):
            if quote == '"' and self._peek() == "\\":
                self._advance()
            self._advance()
        value = self._text[start:self._pos]
        self._advance()
        return value

    def _key(self) -> list[str]:
        """A dotted key at the position: its parts."""
        parts: list[str] = []
        while True:
            self._skip_blank(newlines=False)
            c = self._peek()
            if c in ('"', "'"):
                parts.append(self._string())
            else:
                start = self._pos
                while self._peek() in _BARE and self._peek():
                    self._advance()
                parts.append(self._text[start:self._pos])
            self._skip_blank(newlines=False)
            if self._peek() != ".":
                return parts
            self._advance()

    def _resolve(self, parts: Sequence[str]) -> KeyPath:
        """A header's path with the current index of each array of tables in it."""
        out: list[PathPart] = []
        for part in parts:
            out.append(part)
            count = self._aot.get(tuple(out))
            if count is not None:
                out.append(count - 1)
        return tuple(out)

    def _scan(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip_blank(newlines=True)
            if self._pos >= len(self._text):
                return
            line = self._line
            if self._peek() == "[":
                is_array = self._peek(1) == "["
                self._advance(2 if is_array else 1)
                parts = self._key()
                self._advance(2 if is_array else 1)
                if is_array:
                    parent = self._resolve(parts[:-1])
                    array = (*parent, parts[-1])
                    self._aot[array] = self._aot.get(array, 0) + 1
                    # Nested arrays of tables start again in each new element.
                    for known in [k for k in self._aot if len(k) > len(array)
                                  and k[:len(array)] == array]:
                        del self._aot[known]
                    self.lines.setdefault(array, line)
                table = self._resolve(parts)
                self.lines[table] = line
                self._skip_to_line_end()
                continue
            parts = self._key()
            path = (*table, *parts)
            self.lines[path] = line
            if self._peek() == "=":
                self._advance()
            self._skip_blank(newlines=False)
            self._value(path)
            self._skip_to_line_end()

    def _skip_to_line_end(self) -> None:
        self._skip_blank(newlines=False)
        if self._peek() == "#":
            self._skip_comment()

    def _value(self, path: KeyPath) -> None:
        """Skip one value, recording the line of each element of an array."""
        c = self._peek()
        if c in ('"', "'"):
            self._string()
        elif c == "[":
            self._advance()
            index = 0
            while True:
                self._skip_blank(newlines=True)
                c = self._peek()
                if c == "]" or not c:
                    self._advance()
                    return
                if c == ",":
                    self._advance()
                    continue
                self.lines[(*path, index)] = self._line
                self._value((*path, index))
                index += 1
        elif c == "{":
            depth = 0
            while self._pos < len(self._text):
                c = self._peek()
                if c in ('"', "'"):
                    self._string()
                    continue
                self._advance()
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return
        else:
            # A number, date, boolean: up to a separator.
            while self._peek() and self._peek() not in ",]}\n#":
                self._advance()
