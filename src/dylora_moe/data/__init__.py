"""Skill data: where examples come from and how they become model inputs."""

from .sources import Example, codealpaca, humaneval, humaneval_x, mbpp, nl2bash, spider, verilogeval

__all__ = ["Example", "codealpaca", "humaneval", "humaneval_x", "mbpp", "nl2bash", "spider", "verilogeval"]
