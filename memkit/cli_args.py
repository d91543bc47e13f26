"""Argument parsing for the ``memkit`` command: a parser whose errors are one-line exceptions, and argument types
that reject bad values with a message naming the flag."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from memkit.errors import ConfigError


class UsageError(ConfigError):
    """A command line that cannot be parsed (unknown flag, missing or malformed value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, raising :class:`UsageError` instead of printing the usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        # argparse takes the "--" of ``--seconds=--`` for the end of options and hands the flag no value at all
        # (a TypeError later); no flag of memkit takes "--" for a value
        for token in sys.argv[1:] if args is None else args:
            if token == "--":
                break
            flag, sep, value = token.partition("=")
            if sep and value == "--" and flag.startswith("-"):
                self.error(f"argument {flag}: expected a value, got '--'")
        return super().parse_known_args(args, namespace)


def positive_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def finite_float(text: str) -> float:
    return _number(text, float, "a number")


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def checked_device(name: str, flag: str = "--device") -> torch.device:
    """A torch device that works here: ``cuda`` on a CPU-only torch, or a GPU index past the last one, is an error
    naming the flag."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise ConfigError(f"{flag} {name}: CUDA is not available here (torch {torch.__version__}, {build}); "
                              f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as exc:  # backends fail with RuntimeError, AssertionError, ... on machines without them
            raise ConfigError(f"{flag} {name} is not usable here ({' '.join(str(exc).split())})") from None
    return device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["ArgumentParser", "UsageError", "positive_int", "nonnegative_int", "positive_float", "finite_float",
           "checked_device", "default_device"]
