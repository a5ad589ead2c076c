"""A terminal console for a long-running command: one timestamped line per event, and a status board that is
redrawn in place on a terminal (printed once per update when the output is a file or a pipe)."""

import time
from typing import IO

__all__ = ["Console"]


class Console:
    """Event lines and a board; on a terminal the board is redrawn in place, else printed on every update."""

    def __init__(self, stream: IO[str], prefix: str = "localnet") -> None:
        self.stream = stream
        self.prefix = prefix
        self.live = stream.isatty()
        self._board_lines = 0
        self._board = ""

    def event(self, text: str) -> None:
        self._erase()
        print(f"[{self.prefix} {time.strftime('%H:%M:%S')}] {text}", file=self.stream, flush=True)
        self._draw(self._board)

    def board(self, text: str) -> None:
        if self.live:
            self._erase()
            self._draw(text)
        else:
            print(text + "\n", file=self.stream, flush=True)

    def _erase(self) -> None:
        if self.live and self._board_lines:
            self.stream.write(f"\x1b[{self._board_lines}F\x1b[J")
            self._board_lines = 0

    def _draw(self, text: str) -> None:
        self._board = text
        if self.live and text:
            print(text, file=self.stream, flush=True)
            self._board_lines = text.count("\n") + 1
