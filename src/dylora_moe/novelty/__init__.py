"""Skill library and novelty detection."""

from .detector import Decision, NoveltyDetector, NoveltyResult
from .library import Skill, SkillLibrary, SkillSample, content_key

__all__ = ["Decision", "NoveltyDetector", "NoveltyResult", "Skill", "SkillLibrary", "SkillSample", "content_key"]
