"""The policy table: detector results → verdict → what the request gets, for every combination."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from image_service.config import load_settings
from image_service.errors import ClientBlocked
from image_service.moderation import (
    Detection, Face, Findings, Policy, PromptFindings, Reason, Refusal, Thresholds, Verdict, ViolationTracker, judge,
)
from image_service.params import ImageParams

THRESHOLDS = Thresholds.from_settings(load_settings().moderation)
PARAMS = ImageParams(
    prompt="p", model="procedural", width=64, height=64, seed=1, nologo=False, enhance=False, private=False,
    nofeed=False, safe=False, negative_prompt="", quality="medium", image=(),
)
BREAST = Detection("FEMALE_BREAST_EXPOSED", 0.8, (10, 10, 50, 50))
FACE = Detection("FACE_FEMALE", 0.8, (0, 0, 40, 40))


def findings(mature: bool, child_face: bool) -> Findings:
    detections = (BREAST,) if mature else ()
    faces = (Face(FACE.box, FACE.score, minor_probability=0.9 if child_face else 0.01, age=9 if child_face else 35),)
    return Findings(detections=detections + (FACE,), faces=faces, models={"test": "injected"})


class TestJudge:
    def test_a_class_at_its_threshold_makes_the_image_mature(self) -> None:
        at = Detection("BUTTOCKS_EXPOSED", THRESHOLDS.mature["BUTTOCKS_EXPOSED"], (0, 0, 9, 9))
        below = dataclasses.replace(at, score=at.score - 0.01)
        assert judge(Findings(detections=(at,)), THRESHOLDS).is_mature
        assert not judge(Findings(detections=(below,)), THRESHOLDS).is_mature

    def test_thresholds_are_per_class(self) -> None:
        """0.45 is enough for genitalia (0.3) but not for buttocks (0.6)."""
        genitalia = Detection("FEMALE_GENITALIA_EXPOSED", 0.45, (0, 0, 9, 9))
        buttocks = Detection("BUTTOCKS_EXPOSED", 0.45, (0, 0, 9, 9))
        assert judge(Findings(detections=(genitalia,)), THRESHOLDS).labels == ("FEMALE_GENITALIA_EXPOSED",)
        assert not judge(Findings(detections=(buttocks,)), THRESHOLDS).is_mature

    def test_covered_parts_and_faces_never_make_an_image_mature(self) -> None:
        covered = Detection("FEMALE_BREAST_COVERED", 0.99, (0, 0, 9, 9))
        assert not judge(Findings(detections=(covered, FACE)), THRESHOLDS).is_mature

    def test_verdict_uses_the_openai_moderation_shape(self) -> None:
        verdict = judge(findings(mature=True, child_face=True), THRESHOLDS)
        assert verdict.categories == {"sexual": True, "sexual/minors": True}
        assert verdict.category_scores == {"sexual": 0.8, "sexual/minors": 0.8}
        assert verdict.labels == ("FEMALE_BREAST_EXPOSED", "child_face")
        assert verdict.models == {"test": "injected"}

    def test_a_likely_minor_face_flags_a_child(self) -> None:
        assert judge(findings(mature=False, child_face=True), THRESHOLDS).is_child
        assert not judge(findings(mature=False, child_face=False), THRESHOLDS).is_child

    def test_a_prompt_naming_a_minor_makes_the_image_a_child_image(self) -> None:
        """The age model has no signal on stylised faces; the prompt does."""
        verdict = judge(findings(mature=True, child_face=False), THRESHOLDS).with_prompt(PromptFindings(minor=True))
        assert verdict.is_child and verdict.never_servable
        assert verdict.categories["sexual/minors"] and "prompt:minor" in verdict.labels

    def test_a_sexual_prompt_alone_does_not_make_an_image_mature(self) -> None:
        verdict = judge(findings(mature=False, child_face=False), THRESHOLDS).with_prompt(PromptFindings(sexual=True))
        assert not verdict.is_mature and verdict.labels == ("prompt:sexual",)

    def test_verdict_round_trips_through_the_cache_dict(self) -> None:
        verdict = judge(findings(mature=True, child_face=True), THRESHOLDS).timed(12.5)
        assert Verdict.from_dict(verdict.to_dict()) == verdict
        assert Verdict.from_dict({**verdict.to_dict(), "added_later": 1}) == verdict


# Every combination of image mature × child face × prompt minor × safe → (refusal or None, logo, listed).
CASES = list(itertools.product([False, True], repeat=4))


def expected(mature: bool, child: bool, safe: bool) -> tuple[Reason | None, bool, bool]:
    if mature and child:
        return Reason.SEXUAL_MINOR_IMAGE, False, False
    if mature and safe:
        return Reason.MATURE_IMAGE_SAFE, False, False
    if mature:
        return None, False, False  # served without logo, unlisted
    return None, True, True


class TestImagePolicy:
    @pytest.mark.parametrize(("mature", "child_face", "prompt_minor", "safe"), CASES)
    def test_policy_table(self, mature: bool, child_face: bool, prompt_minor: bool, safe: bool) -> None:
        """Mature+child refused always, mature refused under safe, mature otherwise served unlisted without logo."""
        verdict = judge(findings(mature, child_face), THRESHOLDS).with_prompt(PromptFindings(minor=prompt_minor))
        params = dataclasses.replace(PARAMS, safe=safe)
        refusal = Policy().for_image(verdict, params)
        reason, logo, listed = expected(mature, child_face or prompt_minor, safe)
        assert (refusal.reason if refusal else None) == reason
        if refusal is None:
            assert (Policy.shows_logo(verdict, params), Policy.listed(verdict, params)) == (logo, listed)

    def test_only_requests_for_sexual_minors_count_as_violations(self) -> None:
        """A safe=true client that got a mature image was unlucky, not abusive."""
        violations = {reason for reason in Reason if Refusal(reason).is_violation}
        assert violations == {Reason.SEXUAL_MINOR_PROMPT, Reason.SEXUAL_MINOR_IMAGE}


class TestPromptPolicy:
    @pytest.mark.parametrize(
        ("minor", "sexual", "safe", "refused"),
        [
            (True, True, False, Reason.SEXUAL_MINOR_PROMPT),
            (True, True, True, Reason.SEXUAL_MINOR_PROMPT),
            (False, True, True, Reason.SEXUAL_PROMPT_SAFE),
            (False, True, False, None),
            (True, False, True, None),
            (True, False, False, None),
            (False, False, True, None),
            (False, False, False, None),
        ],
    )
    def test_prompt_table(self, minor: bool, sexual: bool, safe: bool, refused: Reason | None) -> None:
        refusal = Policy().for_prompt(PromptFindings(minor, sexual), dataclasses.replace(PARAMS, safe=safe))
        assert (refusal.reason if refusal else None) == refused

    def test_sexual_prompt_with_safe_can_be_allowed_by_configuration(self) -> None:
        params = dataclasses.replace(PARAMS, safe=True)
        assert Policy(safe_refuses_sexual_prompt=False).for_prompt(PromptFindings(sexual=True), params) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestViolationTracker:
    def make(self, clock: FakeClock) -> ViolationTracker:
        return ViolationTracker(threshold=3, half_life=600, max_clients=2, clock=clock)

    def test_third_violation_blocks_for_one_half_life(self) -> None:
        clock = FakeClock()
        tracker = self.make(clock)
        client = tracker.client_id("203.0.113.7")
        assert [tracker.record(client) for _ in range(3)] == [False, False, True]
        with pytest.raises(ClientBlocked) as blocked:
            tracker.admit(client)
        assert blocked.value.status == 429 and blocked.value.headers() == {"Retry-After": "600"}
        clock.now += 599
        with pytest.raises(ClientBlocked):
            tracker.admit(client)
        clock.now += 2
        tracker.admit(client)

    def test_the_score_decays(self) -> None:
        """Violations spread over hours never add up to a block."""
        clock = FakeClock()
        tracker = self.make(clock)
        client = tracker.client_id("203.0.113.7")
        for _ in range(10):
            assert not tracker.record(client)
            clock.now += 1800
        tracker.admit(client)
        assert tracker.score(client) < 1.2

    def test_clients_are_tracked_apart_and_by_keyed_hash_only(self) -> None:
        clock = FakeClock()
        tracker = self.make(clock)
        one, two = tracker.client_id("203.0.113.7"), tracker.client_id("203.0.113.8")
        for _ in range(3):
            tracker.record(one)
        tracker.admit(two)
        assert one is not None and "203.0.113.7" not in one and len(one) == 32
        assert ViolationTracker(3, 600, 2).client_id("203.0.113.7") != one  # a fresh key per process

    def test_memory_is_bounded_by_forgetting_the_least_recent_client(self) -> None:
        clock = FakeClock()
        tracker = self.make(clock)
        ids = [tracker.client_id(f"203.0.113.{i}") for i in range(3)]
        for client in ids:
            tracker.record(client)
        assert tracker.score(ids[0]) == 0 and tracker.score(ids[2]) == 1

    def test_bad_options_fail_in_the_constructor(self) -> None:
        with pytest.raises(ValueError):
            ViolationTracker(threshold=0, half_life=600, max_clients=10)
