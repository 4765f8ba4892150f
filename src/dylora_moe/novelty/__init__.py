"""Skill library and novelty detection."""

from .detector import NoveltyDetector, NoveltyResult
from .library import Skill, SkillLibrary

__all__ = ["NoveltyDetector", "NoveltyResult", "Skill", "SkillLibrary"]
