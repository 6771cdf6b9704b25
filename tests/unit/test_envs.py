"""envs: the extraction rule, reasoning-gym families (presets, scoring, disjoint splits, errors),
the toy family, and the registry."""

import pytest

from envs import (
    Environment,
    EnvSpecError,
    Message,
    TaskFamily,
    available_families,
    extract_answer,
    make_family,
)
from envs.reasoning_gym import EASY_PRESETS, ReasoningGymFamily
from envs.toy import ToyFamily

# --- extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "gold", "expected"),
    [
        ("Let me think.\nThe answer is 12.", "12", "12"),
        ("answer: 3\nWait, no. Final answer: **7**.", "7", "7"),  # the LAST marker wins
        ("ANSWER:\n  `cimho`  \nmore text", "cimho", "cimho"),  # empty marker line: next line
        ("The answer is: 'nus'", "nus", "nus"),  # surrounding quotes
        ("4 + 3 = 7", "7", "7"),  # what follows the last "="
        ("x = 2 + 3 = 5.", None, "5"),
        ("There are 2 dogs, so 2 * 4 legs, 8 legs in total", "8", "8"),  # last number
        ("5 - 33 is -28", "-28", "-28"),
        ("10-3", "3", "3"),  # a minus after a digit is an operator, not a sign
        ("2.5 apples", "2.5", "2.5"),
        ("\n\n  nus  \nsecond line", "nus", "nus"),  # first non-empty line
        ("['a', 'b']", "['a', 'b']", "['a', 'b']"),  # list answers stay whole
        ("'a', 'b'", None, "'a', 'b'"),  # inner quotes: the outer pair is not stripped
        ("The answer is ['4.0', '40.0'].", "['4.0', '40.0']", "['4.0', '40.0']"),
        ("My answer is 7 and that is it", "cat", "7 and that is it"),  # no number rule for text gold
        ("a = b", "a = b", "a = b"),  # gold with "=": the "=" rule is off
        ("", "3", ""),
    ],
)
def test_extract_answer(raw, gold, expected):
    assert extract_answer(raw, gold) == expected


def test_extraction_keeps_the_raw_text():
    raw = "The answer is **42**."
    assert extract_answer(raw, "42") == "42"
    assert raw == "The answer is **42**."  # pure: the caller's raw text is intact


# --- reasoning-gym ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def leg_counting():
    return make_family("rg:leg_counting", eval_size=100)


def test_rg_family_meets_the_protocol(leg_counting):
    assert isinstance(leg_counting, TaskFamily)
    assert leg_counting.name == "rg:leg_counting"
    assert leg_counting.success_threshold == 1.0
    assert leg_counting.split_size("eval") == 100
    environment = leg_counting.make("eval", 17)
    assert isinstance(environment, Environment)
    assert environment.item_id == "eval-17"
    assert environment.family == "rg:leg_counting"


def test_easy_preset_is_applied(leg_counting):
    assert leg_counting.config == EASY_PRESETS["leg_counting"]
    for index in range(20):
        animals = leg_counting.make("eval", index).entry["metadata"]["animals"]
        assert 1 <= len(animals) <= 2
        assert all(1 <= count <= 3 for count in animals.values())


def test_user_options_override_the_preset():
    family = make_family("rg:leg_counting", {"max_animals": 4, "min_animals": 4}, eval_size=5)
    assert family.config["max_animals"] == 4
    assert len(family.make("eval", 0).entry["metadata"]["animals"]) == 4


def test_prompt_is_question_plus_instruction(leg_counting):
    environment = leg_counting.make("eval", 0)
    (message,) = environment.initial_observation()
    assert message.role == "user"
    assert message.content.startswith(environment.question.rstrip())
    assert message.content.endswith("\n\nRespond with only the final answer.")
    custom = make_family("rg:leg_counting", eval_size=5, instruction=" Think step by step.")
    assert custom.make("eval", 0).initial_observation()[0].content.endswith("? Think step by step.")


@pytest.mark.parametrize("spec", ["rg:leg_counting", "rg:basic_arithmetic"])
def test_gold_answer_scores_one_and_a_wrong_one_zero(spec):
    family = make_family(spec, eval_size=10)
    for index in range(10):
        gold = family.make("eval", index).entry["answer"]
        right = family.make("eval", index).step(f"Let me see.\nThe answer is **{gold}**.")
        assert right.done and right.reward == 1.0
        assert right.info == {"extracted": gold, "gold": gold}
        wrong = family.make("eval", index).step(str(int(gold) + 1))
        assert wrong.done and wrong.reward == 0.0


def test_basic_arithmetic_easy_items_are_small_sums():
    family = make_family("rg:basic_arithmetic", eval_size=30)
    for index in range(30):
        expression = family.make("eval", index).entry["metadata"]["expression"]
        assert set(expression) <= set("0123456789+- ")
        assert all(len(number.strip()) <= 2 for number in expression.replace("-", "+").split("+"))


def test_environment_is_single_use(leg_counting):
    environment = leg_counting.make("eval", 3)
    environment.step("0")
    with pytest.raises(RuntimeError):
        environment.step("0")


def test_train_and_eval_share_no_question(leg_counting):
    eval_questions = [leg_counting.make("eval", index).question for index in range(100)]
    train_questions = [leg_counting.make("train", index).question for index in range(300)]
    assert len(set(eval_questions)) == 100
    assert len(set(train_questions)) == 300
    assert not set(eval_questions) & set(train_questions)
    assert leg_counting.make("train", 3).item_id == "train-3"


def test_splits_come_from_separate_seed_ranges(leg_counting):
    import reasoning_gym

    config = EASY_PRESETS["leg_counting"]
    eval_first = reasoning_gym.create_dataset("leg_counting", seed=10**7, size=1000, **config)[0]
    train_first = reasoning_gym.create_dataset("leg_counting", seed=0, size=1000, **config)[0]
    assert leg_counting.make("eval", 0).question == eval_first["question"]
    assert train_first["question"] != eval_first["question"]
    assert leg_counting.make("train", 0).question == train_first["question"]


def test_splits_deduplicate_a_small_question_space():
    # 2-5 legs of one kind of animal: few distinct questions, so the seed ranges repeat themselves
    family = make_family("rg:leg_counting", {"max_animals": 1, "max_instances": 2}, eval_size=40)
    eval_questions = {family.make("eval", index).question for index in range(40)}
    train_questions = [family.make("train", index).question for index in range(20)]
    assert len(eval_questions) == 40
    assert len(set(train_questions)) == 20
    assert not eval_questions & set(train_questions)


def test_exhausted_question_space_is_reported():
    family = make_family("rg:count_bits", {"min_n": 1, "max_n": 8}, eval_size=20)
    with pytest.raises(EnvSpecError, match="ran out of new questions"):
        family.make("eval", 0)


def test_same_spec_gives_the_same_items():
    first = make_family("rg:basic_arithmetic", eval_size=20)
    second = make_family("rg:basic_arithmetic", eval_size=20)
    for split in ("eval", "train"):
        for index in (0, 7, 19):
            assert first.make(split, index).question == second.make(split, index).question
    other_seed = make_family("rg:basic_arithmetic", eval_size=20, seed=1)
    assert [other_seed.make("eval", index).question for index in range(20)] != [
        first.make("eval", index).question for index in range(20)
    ]


def test_a_crashing_scorer_gives_reward_zero(leg_counting):
    class CrashingScorer:
        def score_answer(self, answer, entry):
            raise ValueError("cannot parse")

    environment = leg_counting.make("eval", 1)
    environment._scorer = CrashingScorer()
    result = environment.step("junk")
    assert result.done and result.reward == 0.0
    assert result.info["score_error"] == "ValueError: cannot parse"


def test_index_outside_the_split_raises(leg_counting):
    with pytest.raises(IndexError):
        leg_counting.make("eval", 100)
    with pytest.raises(IndexError):
        leg_counting.make("train", -1)


def test_wrong_dataset_name_lists_the_names():
    with pytest.raises(EnvSpecError) as error:
        make_family("rg:leg_countin")
    assert "leg_counting" in str(error.value) and "basic_arithmetic" in str(error.value)


@pytest.mark.parametrize(
    ("options", "settings", "mentions"),
    [
        ({"max_legs": 3}, {}, ["max_legs", "min_animals", "max_instances"]),  # unknown field
        ({"min_animals": 0}, {}, ["min_animals must be positive", "valid config fields"]),  # rejected value
        ({"size": 3}, {}, ["size", "set by the family"]),  # reserved
        ({"seed": 3}, {"seed": 4}, ["seed given twice"]),
        ({}, {"preset": "hard"}, ["preset"]),
        ({}, {"eval_size": 0}, ["eval_size"]),
    ],
)
def test_bad_option_names_the_problem(options, settings, mentions):
    with pytest.raises(EnvSpecError) as error:
        make_family("rg:leg_counting", options, **settings)
    for text in mentions:
        assert text in str(error.value)


def test_simple_equations_operators_need_matching_weights():
    with pytest.raises(EnvSpecError, match="operators_weights"):
        make_family("rg:simple_equations", {"operators": ("+", "-", "*")})
    family = make_family(
        "rg:simple_equations",
        {"operators": ("+", "-", "*"), "operators_weights": [0.4, 0.4, 0.2]},
        eval_size=3,
    )
    assert family.make("eval", 0).question


@pytest.mark.parametrize("dataset", sorted(EASY_PRESETS))
def test_every_easy_preset_constructs(dataset):
    family = ReasoningGymFamily(dataset, eval_size=5)
    environment = family.make("eval", 4)
    assert environment.step(str(environment.entry["answer"])).reward == 1.0


def test_settings_may_come_in_options():
    family = make_family("rg:leg_counting", {"preset": "default", "seed": 3, "eval_size": 4})
    assert family.config == {} and family.settings.seed == 3 and family.split_size("eval") == 4


def test_default_preset_uses_reasoning_gym_config():
    family = make_family("rg:leg_counting", preset="default", eval_size=5)
    assert family.config == {}
    assert any(len(family.make("eval", index).entry["metadata"]["animals"]) > 2 for index in range(5))


# --- toy ----------------------------------------------------------------------------------------


def test_toy_multi_turn_episode():
    family = make_family("toy:3")
    assert isinstance(family, ToyFamily) and family.name == "toy:3"
    environment = family.make("train", 2)
    (prompt,) = environment.initial_observation()
    words = environment.words
    assert prompt == Message(role="user", content=f"Say the word: {words[0]}")
    first = environment.step(f"Sure: {words[0]}")
    assert (first.reward, first.done) == (pytest.approx(1 / 3), False)
    assert first.observation == [Message(role="user", content=f"Say the word: {words[1]}")]
    second = environment.step("no idea")
    assert (second.reward, second.done) == (0.0, False)
    third = environment.step(words[2])
    assert third.done and third.observation == [] and third.reward == pytest.approx(1 / 3)
    with pytest.raises(RuntimeError):
        environment.step(words[2])


def test_toy_all_right_reaches_the_success_threshold():
    for turns in (1, 3, 7):
        family = make_family(f"toy:{turns}")
        environment = family.make("eval", 5)
        total = sum(environment.step(word).reward for word in environment.words)
        assert total >= family.success_threshold
        assert total - 1 / turns < family.success_threshold  # one wrong turn is not a success


def test_toy_is_deterministic_and_splits_are_disjoint():
    family = make_family("toy", {"turns": 2})
    assert family.make("train", 4).words == make_family("toy:2").make("train", 4).words
    train_words = {
        word for index in range(family.split_size("train")) for word in family.make("train", index).words
    }
    eval_words = {
        word for index in range(family.split_size("eval")) for word in family.make("eval", index).words
    }
    assert train_words and eval_words and not train_words & eval_words


def test_toy_raise_on_turn():
    environment = make_family("toy:3", raise_on_turn=2).make("eval", 0)
    environment.step(environment.words[0])
    with pytest.raises(RuntimeError, match="toy failure"):
        environment.step(environment.words[1])


# --- registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["gym:leg_counting", "rg", "toy:two", "toy:0"])
def test_bad_spec_raises_env_spec_error(spec):
    with pytest.raises(EnvSpecError):
        make_family(spec)


def test_unknown_kind_lists_the_kinds():
    with pytest.raises(EnvSpecError) as error:
        make_family("gym:leg_counting")
    assert "rg:<dataset>" in str(error.value) and "toy" in str(error.value)


def test_toy_spec_and_option_must_agree():
    with pytest.raises(EnvSpecError, match="conflicts"):
        make_family("toy:2", {"turns": 3})


def test_available_families():
    families = available_families()
    assert "rg:leg_counting" in families and "rg:word_sorting" in families and "toy" in families
    assert len(families) > 100
