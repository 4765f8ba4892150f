"""Skill data: where examples come from and how they become model inputs."""

from .sources import Example, humaneval, verilogeval

__all__ = ["Example", "humaneval", "verilogeval"]
