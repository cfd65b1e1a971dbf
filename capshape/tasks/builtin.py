"""Built-in procedurally generated tasks. Operands are small (two digits) so a tiny
transformer can learn them on a CPU; every task has a distinct tag in its prompt."""
from __future__ import annotations

import random
import string

from capshape.tasks.base import Task, compose, register

MODULUS = 97


def _binary(symbol: str, low_b: int = 0, high_a: int = 99, high_b: int = 99):
    def sample(rng: random.Random) -> str:
        return f"{rng.randint(0, high_a)}{symbol}{rng.randint(low_b, high_b)}"

    return sample


def _operands(text: str, symbol: str) -> tuple[int, int]:
    a, b = text.split(symbol)
    return int(a), int(b)


def _letters(low: int, high: int, alphabet: str = string.ascii_lowercase):
    def sample(rng: random.Random) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))

    return sample


def _record(rng: random.Random) -> str:
    keys = rng.sample(string.ascii_lowercase, 3)
    record = ";".join(f"{k}={rng.randint(0, 9)}" for k in keys)
    return f"{record}|{rng.choice(keys)}"


def _lookup(text: str) -> str:
    record, key = text.split("|")
    return dict(pair.split("=") for pair in record.split(";"))[key]


add = register(Task("add", "arithmetic", "A", _binary("+"), lambda s: str(sum(_operands(s, "+"))),
                    "a+b, a,b in 0..99"))
sub = register(Task("sub", "arithmetic", "S", _binary("-"), lambda s: str(_operands(s, "-")[0] - _operands(s, "-")[1]),
                    "a-b, a,b in 0..99 (may be negative)"))
mul = register(Task("mul", "arithmetic", "M", _binary("*", high_b=9),
                    lambda s: str(_operands(s, "*")[0] * _operands(s, "*")[1]), "a*b, a in 0..99, b in 0..9"))
div = register(Task("div", "arithmetic", "D", _binary("/", low_b=1, high_b=9),
                    lambda s: str(_operands(s, "/")[0] // _operands(s, "/")[1]), "a//b, a in 0..99, b in 1..9"))
modadd = register(Task("modadd", "arithmetic", "P", _binary("+", high_a=MODULUS - 1, high_b=MODULUS - 1),
                       lambda s: str(sum(_operands(s, "+")) % MODULUS), f"(a+b) mod {MODULUS}, the grokking task"))
invented = register(Task("invented", "arithmetic", "I", _binary("&", low_b=1, high_b=9),
                         lambda s: str((_operands(s, "&")[0] + 3) // _operands(s, "&")[1]),
                         "a&b := (a+3)//b, an operation no prior data can teach"))
reverse = register(Task("reverse", "string", "R", _letters(3, 6), lambda s: s[::-1], "reverse a lowercase string"))
sort = register(Task("sort", "string", "O", _letters(3, 6, string.digits), lambda s: "".join(sorted(s)),
                     "sort a string of digits"))
copy = register(Task("copy", "string", "C", _letters(3, 6), lambda s: s, "copy a lowercase string"))
kv = register(Task("kv", "retrieval", "K", _record, _lookup, "parse k=v;k=v;k=v|key and return the key's value"))
rev_add = register(compose("rev_add", reverse, add, inputs_from=add))
add_rev = register(compose("add_rev", add, reverse))
