from lmlink.engine.stops import StopStringMatcher


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for p in pieces:
        text, stopped = matcher.feed(p)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_no_stops_passes_text_through():
    assert feed_all(StopStringMatcher(()), ["ab", "cd"]) == ("abcd", False)


def test_stop_split_across_pieces_is_never_emitted():
    m = StopStringMatcher(("END",))
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("D and more") == ("", True)


def test_false_start_is_released():
    m = StopStringMatcher(("END",))
    assert m.feed("xE") == ("x", False)
    assert m.feed("Nx") == ("ENx", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(StopStringMatcher(("b", "cd")), ["acdxb"]) == ("a", True)


def test_held_text_flushed_at_end():
    assert feed_all(StopStringMatcher(("STOP",)), ["go ST"]) == ("go ST", False)
