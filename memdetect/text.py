"""Names as plain one-line text: the one escaping helper for everything memdetect prints.

File names, model names, config values and checkpoint names are chosen by whoever made the file, so a message that
prints one must not let it act on the terminal or the log: an ESC starts a colour or cursor sequence (or an OSC
that sets the window title), a newline or carriage return forges a line of its own ("memdetect: scan OK"), a
Unicode bidirectional override reorders what is shown. ``printable`` writes every such character as a Python
escape (``\\x1b``, ``\\n``, ``\\u202e``), so the text stays on one line and reads as what it is. Rich markup
(``[/x]``) is a separate matter: the CLI's consoles do not parse markup, and styled text is built as ``rich.text.Text``.

Used by the terminal output, logs, GitHub annotations and step summary, JUnit XML, the HTML report and error
messages; ``memdetect.models.edm.safe_pickle`` uses it for names taken from checkpoints (with a length limit).
"""

from __future__ import annotations


def printable(text: object, limit: int | None = None) -> str:
    """``text`` as plain one-line text: every character that is not printable (C0/C1 controls such as ESC, newline,
    carriage return and tab, DEL, Unicode line separators, bidirectional overrides and other format characters,
    lone surrogates) written as a Python escape (``\\x1b``, ``\\n``, ``\\u202e``); with ``limit``, cut to that many
    characters first (then ``...``)."""
    text = text if isinstance(text, str) else str(text)
    cut = limit is not None and len(text) > limit
    if cut:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                       for c in text)
    return text + "..." if cut else text


__all__ = ["printable"]
