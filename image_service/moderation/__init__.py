"""The moderation stage: prompt checks before generation, classifiers on every image, and the policy.

    prompts.py      normalised word-boundary matching of minor and sexual terms
    classifiers.py  NudeNet + the face-age model, synchronous (runs in the CPU pool)
    moderator.py    findings → Verdict with the configured thresholds; model loading at start-up
    verdict.py      the Verdict (OpenAI moderation shape) and the Moderator interface
    policy.py       what is refused or served unlisted; per-client violation blocks
"""

from .classifiers import Classifiers, Detection, Face, Findings, ModelFileMissing
from .moderator import ClassifierModerator, Thresholds, judge, load_classifiers, load_moderator
from .policy import ContentPolicy, Policy, Reason, Refusal, ViolationTracker
from .prompts import PromptChecker, PromptFindings, normalise
from .verdict import Moderator, PassThroughModerator, Verdict

__all__ = [
    "ClassifierModerator",
    "Classifiers",
    "ContentPolicy",
    "Detection",
    "Face",
    "Findings",
    "ModelFileMissing",
    "Moderator",
    "PassThroughModerator",
    "Policy",
    "PromptChecker",
    "PromptFindings",
    "Reason",
    "Refusal",
    "Thresholds",
    "Verdict",
    "ViolationTracker",
    "judge",
    "load_classifiers",
    "load_moderator",
    "normalise",
]
