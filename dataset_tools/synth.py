"""Synthetic LaTeX formulas, already normalized in the im2markup convention of im2latex-100k.

Every token is separated by one space; scripts are always braced, subscript first
(`x _ { i } ^ { 2 }`); text is spelled letter by letter with `~` for a space
(`\\mathrm { ~ i f ~ }`); named operators are `\\operatorname { s i n }` and
`\\operatorname* { l i m }`; matrix cells are braced and every row ends with `\\\\`
(`\\begin{matrix} { a } & { b } \\\\ \\end{matrix}`); cases are
`\\left\\{ \\begin{cases} ... \\end{cases} \\right.`. These are the forms the reference normalizer
gives for arXiv formulas, so synthetic and real labels share one vocabulary and one spelling.

The generator is a small probabilistic grammar. A formula is a chain of sides joined by relations;
a side is a sum of products; a product is an optional numeric coefficient followed by factors; a
factor is one construct (scripted symbol, function call, fraction, root, big operator with limits,
delimited group, derivative, matrix, cases, ...) whose parts are again sides, one level deeper.
Like a paper, each formula has a few symbols it keeps reusing and a style of its own (construct
weights scaled by random factors), so fractions, accents, ... cluster as in real formulas. Lengths
follow a gamma distribution truncated at `max_tokens` (of a few candidates the one closest to the
drawn length is kept). The symbol tables and weights below were chosen by looking at token counts of
arXiv display formulas; no file outside this module is read, so a fresh clone can build the default
dataset. Every emitted token renders with `\\documentclass{article}` +
`\\usepackage{amsmath,amssymb,amsfonts}`, and `dataset_tools.normalize` leaves every formula as it is.

    formulas = generate(1000, seed=0)                                    # library use
    python -m dataset_tools.synth -n 100000 --seed 0 -o data/synth.txt   # one formula a line
    compare_to_corpus(formulas, real_formulas)  # JS divergences of lengths and tokens, coverage
"""
from __future__ import annotations

import argparse
import bisect
import difflib
import itertools
import math
import os
import random
import statistics
from collections import Counter
from dataclasses import dataclass, fields

from pix2tex.fileio import atomic_write_lines


@dataclass(frozen=True)
class SynthConfig:
    """Shape of the generated distribution. Factor weights are relative (need not sum to 1)."""
    # lengths follow a gamma distribution (mean, shape) truncated at max_tokens; the defaults give
    # mean ~62, median ~57, sd ~32 tokens like the arXiv display formulas
    mean_tokens: float = 66.0  # mean before truncation (about the output mean when << max_tokens)
    length_shape: float = 3.0  # gamma shape: larger is narrower
    min_tokens: int = 3
    max_tokens: int = 150  # hard limit, never exceeded
    max_depth: int = 3  # nesting of fractions / roots / groups / long scripts inside each other
    # what a factor of a product is
    w_symbol: float = 40.0  # letter / Greek / accented / font symbol, with scripts
    w_func: float = 9.0  # f ( x , y )
    w_exp: float = 1.2  # e ^ { - i k x }
    w_operator: float = 2.2  # \operatorname { s i n } x
    w_limit: float = 0.9  # \operatorname* { l i m } _ { n \to \infty } ...
    w_frac: float = 6.5
    w_sqrt: float = 1.1
    w_bigop: float = 3.0  # \sum / \int / \prod with limits
    w_group: float = 6.0  # ( ... ), \left( ... \right), \big [ ... \big ]
    w_delim: float = 2.0  # | x |, \| x \|, \langle x \rangle, \{ x \mid ... \}
    w_deriv: float = 1.2  # \partial _ { t } u, \frac { d } { d t }, d x
    w_matrix: float = 0.45  # \left( \begin{matrix} ... \end{matrix} \right) and arrays
    w_cases: float = 0.3  # \left\{ \begin{array} { l l } ... \right. and cases
    w_misc: float = 0.4  # \binom, \underbrace, \overset, \xrightarrow, ...
    # symbols and scripts
    p_sub: float = 0.42
    p_sup: float = 0.23
    p_long_script: float = 0.2  # a script that is a small expression instead of one index
    p_greek: float = 0.28
    p_reuse: float = 0.6  # a symbol is one of the formula's palette of 3-7 symbols
    p_accent: float = 0.065
    p_font: float = 0.09
    style_shape: float = 0.6  # per-formula weights get Gamma(shape, 1/shape) noise; 0: none
    # how sides are built
    p_coefficient: float = 0.12  # a product starts with a number (2 x, \frac { 1 } { 2 } x)
    p_number: float = 0.08  # a whole product is a number (= 0, + 1)
    p_dots: float = 0.03  # a product is \cdots / \ldots (a _ { 1 } + \cdots + a _ { n })
    p_comma: float = 0.02  # products of a side joined by a comma (else a binary operator)
    p_left_right: float = 0.5  # a group with tall content uses \left ... \right
    p_sized: float = 0.06  # a group uses \big ( ... \big ) and friends
    p_tuple: float = 0.12  # a group holds a comma list: ( x , y ), [ 0 , T ]
    p_continuation: float = 0.1  # formula starts with a relation or +/- (a row of a split display)
    p_clause: float = 0.06  # a second chain after ", \quad"
    p_condition: float = 0.12  # "\quad \mathrm { f o r } ~ x > 0", ", \quad x \in \Omega"
    p_aligned: float = 0.012  # \begin{aligned} with two rows
    p_punct: float = 0.6  # trailing "." or ","

    def __post_init__(self):
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"SynthConfig: need 1 <= min_tokens ({self.min_tokens}) <= max_tokens "
                             f"({self.max_tokens})")
        if self.min_tokens > self.max_tokens // 2:
            raise ValueError(f"SynthConfig: min_tokens ({self.min_tokens}) must be at most half of "
                             f"max_tokens ({self.max_tokens})")
        if self.max_tokens < 20:
            raise ValueError(f"SynthConfig: max_tokens ({self.max_tokens}) must be >= 20")
        if not 0 < self.mean_tokens <= 2 * self.max_tokens:  # lengths are drawn below max_tokens
            raise ValueError(f"SynthConfig: mean_tokens ({self.mean_tokens}) must be in "
                             f"(0, 2 * max_tokens = {2 * self.max_tokens}]")
        if self.max_depth < 0:
            raise ValueError(f"SynthConfig: max_depth ({self.max_depth}) must be >= 0")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise ValueError(f"SynthConfig: {f.name}={value} is a probability, must be in [0, 1]")
            if f.name.startswith("w_") and value < 0:
                raise ValueError(f"SynthConfig: {f.name}={value} is a weight, must be >= 0")
        if self.w_symbol <= 0:
            raise ValueError("SynthConfig: w_symbol must be > 0 (symbols are the fallback factor)")


class Table:
    """Weighted items; an item is one or more tokens, drawn with `pick(rng)` as a tuple."""

    def __init__(self, spec: str):
        """`spec`: 'item:weight ...'; `_` inside an item separates its tokens, `@` two parts."""
        items, weights = [], []
        for part in spec.split():
            item, _, weight = part.rpartition(":")
            items.append(tuple(item.replace("_", " ").split()))
            weights.append(float(weight))
        self.items = items
        self.cum = list(itertools.accumulate(weights))

    def pick(self, rng: random.Random) -> tuple[str, ...]:
        return self.items[bisect.bisect(self.cum, rng.random() * self.cum[-1])]


# --- symbol tables (weights guided by arXiv display-math token counts) --------------------------
LOWER = Table("x:10 t:6 n:5 k:5 i:3 s:3 m:3.5 r:4 a:4.5 p:4 j:2 c:3 l:2 f:4 u:3.5 y:3.5 g:3 "
              "z:3 v:2.5 h:2.5 b:2.5 q:2.5 w:1.8 e:1.2 d:0.5 o:0.2")
UPPER = Table("A:3 N:2.5 L:2.5 P:2.5 B:2.5 R:2.5 S:2.5 C:2.5 E:2.3 M:2.2 H:2.1 X:2 D:2 F:2 T:2.5 "
              "I:1.7 V:1.6 K:1.6 G:1.6 Q:1.2 U:1.1 W:1.1 J:1 Z:1 Y:0.9 O:0.7")
GREEK = Table(r"\alpha:3.1 \mu:2.4 \lambda:2.2 \theta:2.2 \sigma:2.1 \pi:2.1 \beta:2 \phi:1.9 "
              r"\rho:1.8 \gamma:1.8 \delta:1.8 \tau:1.7 \nu:1.3 \omega:1.5 \Delta:1.4 \eta:1.2 "
              r"\xi:1.2 \epsilon:1.2 \psi:1 \Omega:0.8 \Phi:0.7 \Gamma:0.7 \varepsilon:0.7 "
              r"\varphi:0.6 \kappa:0.6 \chi:0.6 \zeta:0.45 \Lambda:0.4 \Psi:0.4 \Sigma:0.4 "
              r"\Theta:0.25 \Pi:0.2 \vartheta:0.1 \iota:0.05 \Xi:0.05 \varrho:0.04 \varpi:0.03 "
              r"\Upsilon:0.03 \upsilon:0.02 \ell:1.1 \hbar:0.2 \infty:0.05 \emptyset:0.05 \nabla:0.3 "
              r"\sharp:0.02 \#:0.01 \aleph:0.01 \wp:0.01")
LEADING_DIGIT = Table("1:4 2:10 3:4 4:3 5:1 6:1 8:1 7:0.5 9:0.5")  # 1 0, 2 x; never 0 1
DIGIT = Table("1:10 2:7 0:4 3:2 4:1.5 5:0.8 6:0.7 8:0.5 7:0.3 9:0.3")
SUB = Table(r"1:53 i:41 2:39 0:35 k:19 j:18 n:16 t:14.5 3:9.7 s:7.3 m:6.4 x:6 p:5.9 c:5.5 r:4.8 "
            r"l:4 4:3.9 a:3.6 \mu:3.5 y:3.5 h:3.4 \alpha:3.4 b:3.1 +:3 z:3 B:3 N:3 A:2.9 d:2.7 "
            r"e:2.6 f:2.5 v:2.3 \nu:2.3 L:2.2 \ell:2.2 -:2.1 T:2.1 q:2.1 5:2.1 u:2.1 R:1.9 "
            r"\theta:1.7 g:1.7 S:1.7 K:1.6 \infty:1.5 F:1.5 6:1.5 *:1.5 w:1.4 X:1.3 "
            r"\mu_\nu:1.4 i_j:4.6 1_2:1.9 k_+_1:1.6 i_,_j:4 0_,_T:1 1_,_2:1 x_,_y:1 n_+_1:1.2 i_-_1:1 "
            r"n_-_1:1 0_,_1:0.8 a_b:0.8 i_k:0.6 \alpha_\beta:0.5 1_1:0.5 2_2:0.5 k_l:0.4 m_n:0.6 "
            r"\uparrow:0.3 \downarrow:0.3 \perp:0.2 \parallel:0.1 \sharp:0.05")
SUP = Table(r"2:87 \prime:30 *:11.7 -_1:9.8 n:8 3:7.7 k:5.5 T:5.5 4:5.2 \infty:4.5 1:4.2 +:4 "
            r"i:4 \dagger:3.2 0:3.1 t:3 m:2.8 N:2.8 \top:2.6 -:2.6 \prime_\prime:2.4 j:2.3 d:2.3 "
            r"(_1_):2.2 \mu:2.2 r:2 p:1.8 1_/_2:1.8 a:1.6 \alpha:1.6 c:1.4 (_2_):1.4 s:1.4 "
            r"\ast:1.4 (_0_):1.3 (_n_):1.1 \star:1.1 L:1.1 \dag:1 l:1 K:1 z:1 6:1 5:0.9 -_2:0.9 "
            r"b:0.9 M:0.9 x:0.8 n_+_1:0.8 \pm:0.8 n_-_1:0.8 (_i_):0.8 k_+_1:0.8 q:0.7 k_-_1:0.7 "
            r"(_k_):0.7 A:0.7 H:0.7 \nu:0.7 -_1_/_2:0.6 2_n:0.6 \mu_\nu:0.6 i_j:0.5 -_s:0.4 "
            r"\uparrow:0.2 \downarrow:0.2 \sharp:0.1")
# \mathrm contents: differentials, constants, labels
ROMAN = Table(r"d:26 e:10 i:8 c:5.6 B:5.6 T_r:5.4 m_a_x:6 m_i_n:4.4 e_f_f:4.2 s:4.5 p:4.2 E:3.8 "
              r"T:3.6 i_n:3.6 L:3.2 R:2.9 I_m:2.8 H:2.6 m:2.5 e_x_p:2.4 t_r:2.4 I:2.4 C:2.3 "
              r"R_e:2.2 t_o_t:2.2 S:2.2 o_u_t:2.1 g:2.1 f:2.1 t:2 P:2 k_i_n:1.5 t_h:1.5 "
              r"r_e_f:1 c_r_i_t:0.8 e_q:1 s_t:0.6 i_n_t:1 o_b_s:0.8 l_o_c:0.6 s_y_s:0.6 "
              r"D_M:0.5 B_H:0.5 n_e_t:0.5 e_x_t:0.7 a_v:0.5 I_I:0.6 G_L:0.4 S_O:0.4 S_U:0.5")
# words of side remarks, `~` is a space
WORDS = Table(r"a_n_d:9 ~_a_n_d_~:5.8 i_f_~:4 i_f:3.5 ~_i_f_~:3 f_o_r:3 ~_f_o_r_~:2.8 "
              r"f_o_r_~_a_l_l:1.5 w_i_t_h:1.2 w_h_e_r_e:1 ~_a_s_~:0.6 i_n:1 o_r:0.6 ~_o_n_~:0.5 "
              r"a_._e_.:0.3 s_._t_.:0.4 ~_i_n_~:0.5")
TEXT_FONT = Table(r"\mathrm:20 \textrm:0.8 \textit:0.4 \textbf:0.4 \textnormal:0.2 \textup:0.1 "
                  r"\emph:0.05")
OPNAME = Table("l_o_g:81 c_o_s:46 s_i_n:44 e_x_p:41 l_n:33 s_i_n_h:7 c_o_s_h:6.4 t_a_n:4.6 "
               "t_a_n_h:4 d_i_m:3.9 a_r_g:3.6 c_o_t:1.4 H_o_m:1.4 d_e_g:1.3 a_r_c_t_a_n:1.1 "
               "k_e_r:0.9 a_r_c_c_o_s:0.9 a_r_c_s_i_n:0.6 T_r:0.5 d_i_v:0.5 d_i_a_g:0.4 "
               "s_g_n:0.4 r_a_n_k:0.4 c_o_t_h:0.9")
LIMNAME = Table("m_a_x:33 m_i_n:30 l_i_m:23 s_u_p:14 d_e_t:7.6 i_n_f:6.7 P_r:6.4 "
                "l_i_m_s_u_p:2 l_i_m_i_n_f:1.5 a_r_g_m_i_n:0.6 a_r_g_m_a_x:0.5")
FONT = Table(r"\mathbf:27 \mathcal:26 \mathbb:10 \boldsymbol:8.3 \mathrm:9 \mathfrak:1.5 "
             r"\mathsf:1 \pmb:0.4 \mathit:0.3 \textbf:0.5")
CAL_LETTER = Table("L:32 A:16 D:16 H:14 O:13 N:12 S:11 P:11 F:11 M:11 C:11 E:10 B:9.5 T:9 G:9 "
                   "R:9 I:7 W:7 K:6.5 J:6 X:6 U:6 V:5 Z:4 Q:4 Y:1.5")
BB_LETTER = Table("E:34 R:17 P:11 Z:6 C:5 I:3.5 N:3.5 S:2.3 F:1.6 Q:1.6 T:1 1:1")
ACCENT = Table(r"\hat:19.5 \tilde:15.2 \bar:13 \vec:6.7 \overline:6 \dot:5 \widetilde:3.8 "
               r"\widehat:3.5 \underline:1.3 \ddot:0.5 \check:0.5 \breve:0.2 \mathring:0.1")
BINOP = Table(r"+:12 -:10 \cdot:1.1 \times:0.6 \pm:0.4 \otimes:0.3 \circ:0.2 \wedge:0.2 "
              r"\cup:0.2 \cap:0.2 \oplus:0.12 \ast:0.12 \star:0.1 \mp:0.05 \setminus:0.1 "
              r"\odot:0.08 \bullet:0.04 \vee:0.04 /:1.2")
RELATION = Table(r"=:16.4 \leq:1.6 \le:0.6 \geq:0.6 \ge:0.2 <:0.7 >:0.5 \approx:0.25 "
                 r"\equiv:0.35 \sim:0.3 \neq:0.2 \ne:0.03 \simeq:0.12 \propto:0.08 \to:0.45 "
                 r"\rightarrow:0.45 \longrightarrow:0.08 \mapsto:0.1 \Rightarrow:0.06 "
                 r"\Leftrightarrow:0.04 \iff:0.02 \in:1.3 \subset:0.1 \subseteq:0.08 \ll:0.03 "
                 r"\gg:0.02 \cong:0.03 \lesssim:0.08 \leqslant:0.06 \geqslant:0.02 :_=:0.4 "
                 r"\models:0.01 \perp:0.03 \leftarrow:0.03 \Longrightarrow:0.02 \implies:0.01 "
                 r"\prec:0.01 \succ:0.01 \asymp:0.01 \doteq:0.01 \gtrsim:0.02 \notin:0.02 "
                 r"\triangleq:0.02 \parallel:0.02 \mid:0.03 ::0.3 \uparrow:0.02 \downarrow:0.02")
SPACE = Table(r"\,:5 ~:2.5 \quad:1.5 \;:1 \!:0.6 \qquad:0.7 \::0.15 \:2")
BIGOP = Table(r"\sum:31 \int:18 \prod:3 \bigcup:0.6 \oint:0.3 \iint:0.3 \bigoplus:0.2 "
              r"\bigcap:0.2 \bigotimes:0.15 \coprod:0.05 \bigvee:0.05 \bigwedge:0.05 \iiint:0.05")
DOTS = Table(r"\cdots:4 \ldots:4 \dots:3")
PLAIN_PAIR = Table(r"(@):30 [@]:2.3 \{@\}:1")  # open@close
LEFT_PAIR = Table(r"\left(@\right):48 \left[@\right]:11 \left\{@\right\}:3.3 \left|@\right|:3.1 "
                  r"\left\|@\right\|:1.1 \left\langle@\right\rangle:1 \left.@\right|:0.4 "
                  r"\left\vert@\right\vert:0.5 \left\lfloor@\right\rfloor:0.15 \left<@\right>:0.35 "
                  r"\left\lceil@\right\rceil:0.06 \left\Vert@\right\Vert:0.45 \left(@\right.:0.1 "
                  r"\left\lbrace@\right\rbrace:0.2")
SIZE = Table(r"\big:8 \Big:8 \bigg:3 \Bigg:0.6")
SIZED_PAIR = Table(r"(@):6 [@]:2 |@|:0.7 \{@\}:0.6 \|@\|:0.3")
ABS_PAIR = Table(r"|@|:8 \|@\|:3 \langle@\rangle:3 \{@\}:1.5 \lfloor@\rfloor:0.1 \vert@\vert:0.4 "
                 r"\Vert@\Vert:0.4 \lvert@\rvert:0.1")
INT_LIMITS = Table(r"0@\infty:4 -_\infty@\infty:2 0@1:3 0@t:2 0@T:2 a@b:1 0@L:0.6 -_1@1:0.6 "
                   r"0@2_\pi:0.5 0@x:0.6")
INDEX = Table(r"i:7 k:4 j:3.5 n:4 m:3 l:2 p:1.5 q:1 s:1.5 t:1.5 \alpha:0.6 \mu:0.8 \nu:0.6 a:1.5 "
              r"x:1.5 r:1 \sigma:0.3 b:1 c:1 \ell:0.5 \beta:0.3")
SUM_UPPER = Table(r"N:6 n:5 \infty:5 M:2 K:1.5 m:1.5 L:1 T:1 d:1 k:1 n_-_1:1 N_-_1:1 2:0.5")
CONDITION_WORD = Table("f_o_r:3 ~_f_o_r_~:2 i_f:2 ~_i_f_~:1 f_o_r_~_a_l_l:1 w_i_t_h:0.5 "
                       "w_h_e_r_e:0.5")
ALIGN = Table("c:5 l:3 r:1")
# shapes of scripts longer than one token
SUB_SHAPE = Table("text:25 indices:16 shift:12 list:20 paren:2 nested:14 ratio:1 phase:1 "
                  "relation:3 expr:13")
SUP_SHAPE = Table("text:6 indices:8 shift:16 list:4 paren:14 nested:12 ratio:10 phase:8 "
                  "relation:2 expr:20")
SIMPLE_FRACTIONS = [("1", "2")] * 6 + [("1", "4"), ("3", "2"), ("1", "3"), ("2", "3"), ("3", "4"),
                                        ("1", "N"), ("1", "n"), ("1", "8"), ("5", "2"), ("1", "6")]
POWERED = {tuple(name.split()) for name in ("s i n", "c o s", "t a n", "l o g", "s i n h", "c o s h")}
FACTOR_COUNT = [0.3, 0.65, 0.85]  # cumulative: a product has 1, 2, 3 or 4 factors
SPACE_TOKENS = {t for item in SPACE.items for t in item}

OVERSHOOT = 4  # tokens by which sides overshoot their wished-for size, on average (measured)
LENGTH_TRIES = 6  # formulas drawn per target length before the closest one is taken
# delimiters of groups, for telling whether a group is just another group in parentheses
OPENERS = {" ".join(item).split("@")[0] for item in PLAIN_PAIR.items + LEFT_PAIR.items}
CLOSERS = {" ".join(item).split("@")[1] for item in PLAIN_PAIR.items + LEFT_PAIR.items}
TALL = {r"\frac", r"\sum", r"\int", r"\prod", r"\sqrt", r"\begin{matrix}", r"\begin{array}"}


def _braced(tokens) -> list[str]:
    return ["{", *tokens, "}"]


def _wrapped(tokens: list[str]) -> bool:
    """Whether `tokens` is one delimited group, e.g. ( a + b ) or \\left[ x \\right]."""
    if len(tokens) < 2 or tokens[0] not in OPENERS:
        return False
    depth = 0
    for i, t in enumerate(tokens):
        depth += (t in OPENERS) - (t in CLOSERS)
        if depth == 0:
            return i == len(tokens) - 1
    return False


def _pair(table: Table, rng: random.Random) -> tuple[str, str]:
    open_, close = " ".join(table.pick(rng)).split("@")
    return open_.strip(), close.strip()


class _Builder:
    """One formula's recursive construction. Every method returns at most `limit` tokens
    (`limit` >= 1), or None where a construct does not fit; `hint` is the wished-for size."""

    def __init__(self, rng: random.Random, cfg: SynthConfig):
        self.rng, self.cfg = rng, cfg
        c = cfg
        # factor kind, weight, smallest size it can take
        table = [("symbol", c.w_symbol, 1), ("func", c.w_func, 4), ("exp", c.w_exp, 4),
                 ("operator", c.w_operator, 10), ("limit", c.w_limit, 12),
                 ("frac", c.w_frac, 7), ("sqrt", c.w_sqrt, 4), ("bigop", c.w_bigop, 9),
                 ("group", c.w_group, 5), ("delim", c.w_delim, 3), ("deriv", c.w_deriv, 3),
                 ("matrix", c.w_matrix, 24), ("cases", c.w_cases, 30), ("misc", c.w_misc, 12)]
        self.kinds = [k for k, _, _ in table]
        self.min_size = [m for _, _, m in table]
        self.flat = [k in ("symbol", "func", "delim", "deriv") for k in self.kinds]
        # each formula has its own style: weights scaled by mean-1 gamma noise, so constructs
        # cluster (a formula with one fraction tends to have several) as in real papers
        self.weights = [w if k == "symbol" else w * self.style() for k, w, _ in table]
        self.p_font = min(0.5, cfg.p_font * self.style())
        self.p_accent = min(0.5, cfg.p_accent * self.style())
        # the formula's own symbols and index letters, reused throughout
        self.palette = [tuple(self.fresh_letter()) for _ in range(rng.randint(3, 7))]
        # an author's conventions hold for the whole formula: upright d and e, labels
        self.d = [r"\mathrm", "{", "d", "}"] if self.chance(0.25) else ["d"]
        self.e = [r"\mathrm", "{", "e", "}"] if self.chance(0.15) else ["e"]
        self.p_label = min(1.0, self.style())  # share of "text" long subscripts kept
        self.seen: dict[str, list] = {}  # earlier draws of labels, operator names, ... (reuse)
        self.indices = [INDEX.pick(rng) for _ in range(2)]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def reuse(self, key: str, draw):
        """A fresh draw, or (with p_reuse) one this formula drew before under `key`."""
        seen = self.seen.setdefault(key, [])
        if seen and self.chance(self.cfg.p_reuse):
            return self.rng.choice(seen)
        seen.append(draw())
        return seen[-1]

    def style(self) -> float:
        """A per-formula weight multiplier: Gamma(shape, 1 / shape), mean 1."""
        shape = self.cfg.style_shape
        return self.rng.gammavariate(shape, 1.0 / shape) if shape > 0 else 1.0

    # --- whole formula -------------------------------------------------------------------------
    def formula(self, target: int) -> list[str]:
        """A whole formula of about `target` tokens (at most max_tokens)."""
        rng, cfg = self.rng, self.cfg
        limit = cfg.max_tokens - 2  # room for the trailing punctuation
        punct = self.chance(cfg.p_punct)
        condition = target >= 20 and self.chance(cfg.p_condition)
        clause = target >= 25 and self.chance(cfg.p_clause)
        # what the main chain should fill: sides overshoot their hints by about OVERSHOOT
        budget = target - punct - 8 * condition - OVERSHOOT
        clause_budget = int(budget * rng.uniform(0.2, 0.45)) if clause else 0
        budget = max(1, budget - clause_budget)
        if target >= 20 and limit >= 60 and self.chance(cfg.p_aligned):
            out = self.aligned(budget, limit)
        else:
            out = self.chain(budget, limit)
            room = limit - len(out) - 3
            if clause and room > 6:  # a = b , \quad c = d
                out += [",", SPACE.pick(rng)[0] if self.chance(0.3) else r"\quad"]
                out += self.chain(max(1, clause_budget - 2), room)
        room = limit - len(out)
        if condition and room > 8:
            out += self.condition(room)
        if punct:
            if self.chance(0.12):
                out.append(SPACE.pick(rng)[0])
            out.append("." if self.chance(0.52) else ",")
        return out

    def chain(self, target: int, limit: int) -> list[str]:
        """lhs rel side rel side ...; sometimes a continuation row that starts with a relation."""
        rng, cfg = self.rng, self.cfg
        out: list[str] = []
        n_rel = self.relation_count()
        if self.chance(cfg.p_continuation):
            out += list(RELATION.pick(rng)) if self.chance(0.6) else [rng.choice(["+", "-"])]
            n_rel = max(0, n_rel - 1)
        sign = not out or out[-1] not in ("+", "-")  # no "+ - x"
        if n_rel == 0:
            return out + self.expr(max(1, target - len(out)), 0, limit - len(out), sign)
        lhs_hint = max(1, int(min(target * rng.uniform(0.1, 0.35), 14)))
        out += self.expr(lhs_hint, 0, limit - len(out) - 4, sign)
        for k in range(n_rel):
            rel = list(RELATION.pick(rng))
            room = limit - len(out) - len(rel)
            if room < 1:
                break
            hint = max(1, (target - len(out)) // (n_rel - k))
            out += rel + self.expr(hint, 0, room)
            if len(out) >= target:
                break
        return out

    def aligned(self, target: int, limit: int) -> list[str]:
        """\\begin{aligned} { lhs } & { { } = rhs } \\\\ { } & { { } = rhs } \\\\ \\end{aligned}"""
        rng = self.rng
        out = ["\\begin{aligned}"]
        for row in range(2):
            room = (limit - 4) // 2 - 9
            lhs = self.expr(max(1, target // 8), 0, room // 3) if row == 0 else []
            rhs = self.expr(max(1, target // 3), 0, room - len(lhs))
            out += [*_braced(lhs), "&", "{", "{", "}", *RELATION.pick(rng), *rhs, "}", "\\\\"]
        return out + ["\\end{aligned}"]

    def relation_count(self) -> int:
        r = self.rng.random()
        for n, p in enumerate((0.15, 0.73, 0.92, 0.975)):
            if r < p:
                return n
        return 4

    def text(self, words: Table) -> list[str]:
        return [TEXT_FONT.pick(self.rng)[0], *_braced(words.pick(self.rng))]

    def condition(self, limit: int) -> list[str]:
        """A side remark: '\\quad \\mathrm { f o r } ~ x > 0' or ', \\quad x \\in \\Omega'."""
        rng = self.rng
        out = [","] if self.chance(0.3) else []
        out.append(r"\qquad" if self.chance(0.25) else r"\quad")
        if self.chance(0.5):
            out += self.text(CONDITION_WORD)
            if self.chance(0.5):
                out.append("~")
        elif self.chance(0.15):
            out.append(r"\forall")
        cond = self.expr(2, 1, 4) + list(RELATION.pick(rng)) + self.expr(2, 1, 4)
        if len(out) + len(cond) > limit:
            return []
        return out + cond

    # --- sides, products, factors --------------------------------------------------------------
    def expr(self, hint: int, depth: int, limit: int, sign: bool = True) -> list[str]:
        """A sum of products (binary operators between them), maybe with a leading minus
        (`sign`); 1 <= len <= limit."""
        if limit < 1:
            raise ValueError(f"synth: expr needs limit >= 1, got {limit} (a construct's size check)")
        rng, cfg = self.rng, self.cfg
        out: list[str] = []
        if sign and limit >= 3 and self.chance(0.06 if depth == 0 else 0.03):
            out.append("-")
        previous = None
        while True:
            remaining = max(1, hint - len(out))
            share = remaining if remaining <= 8 or self.chance(0.3) else int(
                remaining * rng.uniform(0.25, 1.0))
            term = self.product(share, depth, limit - len(out))
            if term == previous:  # t + t: draw again once
                term = self.product(share, depth, limit - len(out))
            out += term
            previous = term
            if len(out) >= hint or limit - len(out) < 3:
                break
            if depth == 0 and self.chance(cfg.p_comma):
                out.append(",")
                if self.chance(0.15):
                    out.append(SPACE.pick(rng)[0])
            else:
                out += BINOP.pick(rng)
            if depth <= 1 and limit - len(out) >= 5 and self.chance(cfg.p_dots):
                out += [DOTS.pick(rng)[0], out[-1]]  # a + \cdots + b, x , \ldots , y
        return out

    def product(self, hint: int, depth: int, limit: int, number: bool = True) -> list[str]:
        """[coefficient] factor factor ... (1-4 factors); a number alone sometimes (`number`)."""
        rng, cfg = self.rng, self.cfg
        if number and self.chance(cfg.p_number):
            return self.number(limit)
        out: list[str] = []
        if limit >= 4 and self.chance(cfg.p_coefficient):
            out += (self.number(limit - 3, coefficient=True) if limit < 10 or self.chance(0.85)
                    else [r"\frac", "{", "1", "}", "{", "2", "}"])
        n_factors = 1 + bisect.bisect(FACTOR_COUNT, rng.random()) + hint // 16
        for k in range(n_factors):
            kind, toks = self.factor(max(1, (hint - len(out)) // (n_factors - k)), depth,
                                     limit - len(out))
            if kind == "symbol" and out and toks[0] == out[-1]:  # x x: draw again once
                kind, toks = self.factor(max(1, (hint - len(out)) // (n_factors - k)), depth,
                                         limit - len(out))
            out += toks
            if len(out) >= hint or limit - len(out) < 2 or kind in ("bigop", "limit"):
                break  # a big operator takes the rest of the product as its body
            if limit - len(out) >= 3 and kind in ("symbol", "group") and self.chance(0.005):
                out.append("!")  # n ! , ( n - k ) !
            if limit - len(out) >= 3 and self.chance(0.06):
                out.append(SPACE.pick(rng)[0])
        if out[-1] in SPACE_TOKENS:
            out.pop()
        return out

    def number(self, limit: int, coefficient: bool = False) -> list[str]:
        """1, 2, 1 0, 0 . 5; a coefficient is never a lone 1."""
        rng = self.rng
        n = 1 if self.chance(0.88) else (2 if self.chance(0.85) else 3)
        out = [DIGIT.pick(rng)[0] for _ in range(min(n, limit))]
        if (len(out) > 1 or coefficient) and out[0] in ("0", "1"):
            out[0] = LEADING_DIGIT.pick(rng)[0]
        if len(out) + 2 <= limit and self.chance(0.06):
            out += [".", DIGIT.pick(rng)[0]]
        return out

    def factor(self, hint: int, depth: int, limit: int) -> tuple[str, list[str]]:
        if depth >= self.cfg.max_depth:  # deepest level: only symbols
            return "symbol", self.t_symbol(hint, depth, limit)
        # big hints make room for structure; structure gets rarer inside structure
        grow = (0.3 + min(3.0, hint / 12.0)) * 0.7 ** depth
        weights = [0.0 if m > limit else w if flat else w * grow
                   for w, m, flat in zip(self.weights, self.min_size, self.flat)]
        for _ in range(3):
            kind = self.rng.choices(self.kinds, weights)[0]
            toks = getattr(self, "t_" + kind)(hint, depth, limit)
            if toks and len(toks) <= limit:
                return kind, toks
        return "symbol", self.letter()

    # --- symbols and scripts -------------------------------------------------------------------
    def fresh_letter(self) -> list[str]:
        rng = self.rng
        if self.chance(self.cfg.p_greek):
            return list(GREEK.pick(rng))
        return list(LOWER.pick(rng) if self.chance(0.62) else UPPER.pick(rng))

    def letter(self) -> list[str]:
        """A symbol, usually one of this formula's few symbols: real formulas repeat theirs."""
        if self.chance(self.cfg.p_reuse):
            return list(self.rng.choice(self.palette))
        return self.fresh_letter()

    def base(self, limit: int = 3) -> list[str]:
        """A symbol, maybe in a font or under an accent (those only when `limit` allows)."""
        rng = self.rng
        r = rng.random() if limit >= 9 else 1.0  # 9: the longest font/accent form
        if r >= self.p_font + self.p_accent:
            return self.letter()
        return list(self.reuse("fancy", lambda: self.fancy_symbol(r < self.p_font)))

    def fancy_symbol(self, use_font: bool) -> list[str]:
        """\\mathcal { L }, \\mathbb { R }, \\mathbf { x }, \\hat { H }, \\overline { x y }."""
        rng = self.rng
        if use_font:
            font = FONT.pick(rng)[0]
            if font == r"\mathcal":
                inner = CAL_LETTER.pick(rng)
            elif font == r"\mathbb":
                inner = BB_LETTER.pick(rng)
            elif font == r"\mathrm":
                inner = ROMAN.pick(rng)
            elif font == r"\boldsymbol" and self.chance(0.5):
                inner = GREEK.pick(rng)
            else:
                inner = LOWER.pick(rng) if self.chance(0.6) else UPPER.pick(rng)
            return [font, *_braced(inner)]
        accent = ACCENT.pick(rng)[0]
        inner = self.letter()
        if accent in (r"\overline", r"\widetilde", r"\widehat") and self.chance(0.25):
            inner = inner + self.letter()
        return [accent, *_braced(inner)]

    def script(self, table: Table, depth: int, limit: int, p_long: float | None = None) -> list[str]:
        """Contents of a sub/superscript: usually a table entry, sometimes a small expression."""
        p_long = self.cfg.p_long_script if p_long is None else p_long
        if limit >= 3 and depth < self.cfg.max_depth and self.chance(p_long):
            out = self.long_script(table is SUP, depth, limit)
            if 0 < len(out) <= limit:
                return out
        if table is SUB and self.chance(0.12):
            return list(self.rng.choice(self.indices))
        item = list(table.pick(self.rng))
        return item if len(item) <= limit else item[:1]

    def index(self) -> list[str]:
        return list(self.rng.choice(self.indices) if self.chance(0.5) else INDEX.pick(self.rng))

    def long_script(self, sup: bool, depth: int, limit: int) -> list[str]:
        """i j, n + 1, i , j, ( n ), x _ { i }, \\mathrm { e f f }, - 1 / 2, - i k x, ..."""
        rng = self.rng
        kind = (SUP_SHAPE if sup else SUB_SHAPE).pick(rng)[0]
        if kind == "text" and not self.chance(self.p_label):
            kind = "indices"
        if kind == "text":  # E _ { \mathrm { e f f } }: labels recur within a formula
            return [r"\mathrm", *_braced(self.reuse("label", lambda: ROMAN.pick(rng)))]
        if kind == "indices":  # i j, \mu \nu \rho
            return self.index() + self.index() + (self.index() if self.chance(0.25) else [])
        if kind == "shift":  # n + 1, i - j, 2 n - 1
            out = ["2"] + self.index() if self.chance(0.15) else self.index()
            return out + [rng.choice(["+", "-", "-"])] + (["1"] if self.chance(0.6) else self.index())
        if kind == "list":  # i , j
            return self.index() + [","] + (self.index() if self.chance(0.7) else [DIGIT.pick(rng)[0]])
        if kind == "paren":  # ( n ), ( k + 1 )
            inner = self.index() if self.chance(0.6) else [DIGIT.pick(rng)[0]]
            return ["(", *inner, ")"]
        if kind == "nested":  # x _ { i }, k _ { 1 } ^ { 2 }
            base = self.fresh_letter() if self.chance(0.5) else self.index()
            return self.scripted(base, self.cfg.max_depth, limit, p_sub=0.9, p_sup=0.15)
        if kind == "ratio":  # 1 / 2, - \frac { 1 } { 2 }, d / 2
            sign = ["-"] if self.chance(0.5) else []
            if self.chance(0.3):
                return sign + [r"\frac", "{", "1", "}", "{", rng.choice(["2", "2", "3", "4"]), "}"]
            num = rng.choice(["1", "1", "3", "d", "n"])
            return sign + [num, "/", rng.choice(["2", "4"] if num == "3" else ["2", "2", "3", "4"])]
        if kind == "phase":  # - i k x, 2 \pi i n / N
            out = (["-"] if self.chance(0.5) else []) + (["2", r"\pi"] if self.chance(0.3) else [])
            out += ["i"] + self.letter() + (self.letter() if self.chance(0.5) else [])
            return out + (["/", *self.letter()] if self.chance(0.2) else [])
        if kind == "relation":  # i = 1, n \to \infty, x \in X
            return self.index() + list(RELATION.pick(rng)) + (
                [DIGIT.pick(rng)[0]] if self.chance(0.6) else self.letter())
        # a small expression, rarely with a fraction or group in it
        deeper = self.cfg.max_depth - (1 if self.chance(0.3) else 0)
        return self.expr(rng.randint(2, 6), max(depth + 1, deeper), limit)

    def scripted(self, base: list[str], depth: int, limit: int,
                 p_sub: float | None = None, p_sup: float | None = None) -> list[str]:
        """base _ { .. } ^ { .. }, each script with its probability, within `limit`."""
        cfg = self.cfg
        out = list(base)
        if limit - len(out) >= 4 and self.chance(cfg.p_sub if p_sub is None else p_sub):
            out += ["_", *_braced(self.script(SUB, depth, limit - len(out) - 3))]
        if limit - len(out) >= 4 and self.chance(cfg.p_sup if p_sup is None else p_sup):
            out += ["^", *_braced(self.script(SUP, depth, limit - len(out) - 3))]
        return out

    def t_symbol(self, hint, depth, limit):
        return self.scripted(self.base(limit), depth, limit)

    def t_exp(self, hint, depth, limit):
        """e ^ { - i k x }, \\mathrm { e } ^ { 2 \\pi i / N }."""
        base = list(self.e)
        sup = self.script(SUP, depth, limit - len(base) - 3, p_long=0.85)
        if self.chance(0.4) and sup[0] != "-" and len(sup) > 1 and len(sup) + len(base) + 4 <= limit:
            sup = ["-", *sup]
        return [*base, "^", *_braced(sup)]

    def args(self, depth: int, limit: int, at_least: int = 1) -> list[str]:
        """Comma- (or semicolon-) separated short arguments."""
        n = max(at_least, 1 if self.chance(0.65) else self.rng.choice([2, 2, 2, 3, 3, 4]))
        n = max(1, min(n, (limit + 1) // 2))
        each = (limit - (n - 1)) // n
        out: list[str] = []
        for i in range(n):
            if i:
                out.append(";" if self.chance(0.05) else ",")
            out += self.expr(self.rng.randint(1, 4), depth + 1, each)
        return out

    def t_func(self, hint, depth, limit):
        """f ( x ) , G _ { i j } ( k , \\omega ) , u ^ { \\prime } [ x ]."""
        rng = self.rng
        name = self.scripted(self.base(limit - 3), depth, limit - 3, p_sup=0.1)
        open_, close = ("(", ")") if self.chance(0.92) else ("[", "]")
        if self.chance(0.08):
            open_, close = r"\left(", r"\right)"
        inner = self.args(depth, min(limit - len(name) - 2, max(9, hint)))
        out = name + [open_, *inner, close]
        if limit - len(out) >= 4 and self.chance(0.06):
            out += ["^", *_braced(SUP.pick(rng))]
        return out

    def t_operator(self, hint, depth, limit):
        """\\operatorname { s i n } ^ { 2 } x, \\operatorname { l o g } ( 1 + x )."""
        rng = self.rng
        name = self.reuse("opname", lambda: OPNAME.pick(rng))
        out = [r"\operatorname", *_braced(name)]
        if name in POWERED and self.chance(0.25):  # \operatorname { s i n } ^ { 2 }
            out += ["^", *_braced(rng.choice(["2", "2", "2", "- 1", "3", "n"]).split())]
        room = limit - len(out)
        if room < 1:
            return None
        if room >= 3 and self.chance(0.55):
            inner = self.expr(rng.randint(1, max(1, min(hint, 12))), depth + 1, room - 2)
            return out + ["(", *inner, ")"]
        return out + self.scripted(self.base(room), depth + 1, room)

    def t_limit(self, hint, depth, limit):
        """\\operatorname* { l i m } _ { n \\to \\infty } body, \\operatorname* { m a x } _ { x }."""
        rng = self.rng
        name = LIMNAME.pick(rng)
        out = [r"\operatorname*", *_braced(name)]
        if self.chance(0.85):
            if name[:3] == ("l", "i", "m"):
                to = r"\to" if self.chance(0.8) else r"\rightarrow"
                sub = self.letter() + [to, *rng.choice([r"\infty", r"\infty", "0", "0 ^ { + }"]).split()]
            elif self.chance(0.6):
                sub = self.letter() + [r"\in", *self.scripted(list(UPPER.pick(rng)), depth + 1, 5,
                                                                p_sup=0.0)]
            else:
                sub = self.letter()
            out += ["_", *_braced(sub)]
        room = limit - len(out)
        if room < 1:
            return None
        return out + self.product(max(1, hint - len(out)), depth + 1, room, number=False)

    def t_frac(self, hint, depth, limit):
        rng = self.rng
        if self.chance(0.15):  # \frac { 1 } { 2 }, \frac { 3 } { N }
            num, den = rng.choice(SIMPLE_FRACTIONS)
            return [r"\frac", "{", num, "}", "{", den, "}"]
        inner = max(2, hint - 5)
        num = ["1"] if self.chance(0.2) else self.expr(
            max(1, int(inner * rng.uniform(0.3, 0.7))), depth + 1, limit - 6)
        den = self.expr(max(1, inner - len(num)), depth + 1, limit - 5 - len(num))
        if den in (["0"], ["1"]):
            den = self.letter()
        out = [r"\frac" if self.chance(0.99) else r"\cfrac", *_braced(num), *_braced(den)]
        if limit - len(out) >= 4 and self.chance(0.02):
            out += ["^", *_braced(SUP.pick(rng))]
        return out

    def t_sqrt(self, hint, depth, limit):
        rng = self.rng
        index = (["[", rng.choice(["3", "3", "n", "4", "k"]), "]"]
                 if limit >= 7 and self.chance(0.12) else [])
        inner = self.expr(max(1, hint - 3 - len(index)), depth + 1, limit - 3 - len(index))
        return [r"\sqrt", *index, *_braced(inner)]

    def t_bigop(self, hint, depth, limit):
        """\\sum _ { i = 1 } ^ { N } body, \\int _ { 0 } ^ { \\infty } body d x, \\prod _ { k }."""
        rng = self.rng
        op = BIGOP.pick(rng)[0]
        out = [op]
        if op in (r"\int", r"\oint", r"\iint", r"\iiint"):
            r = rng.random()
            if r < 0.55:
                lo, hi = _pair(INT_LIMITS, rng)
                out += ["_", *_braced(lo.split()), "^", *_braced(hi.split())]
            elif r < 0.8:
                domain = self.letter() if self.chance(0.5) else [r"\mathbb", "{", "R", "}"]
                out += ["_", *_braced(self.scripted(domain, depth + 1, 6, p_sub=0.0, p_sup=0.4))]
            var = list(LOWER.pick(rng)) if self.chance(0.7) else self.letter()
            d = list(self.d)
            if self.chance(0.3):
                d.insert(0, r"\,")
            room = limit - len(out) - len(d) - len(var)
            if room < 1:
                return None
            body = self.product(max(1, hint - len(out) - 2), depth + 1, room, number=False)
            return out + body + d + var
        i = list(self.indices[0])
        r = rng.random()
        if r < 0.6:
            lo = i + ["=", *rng.choice(["1", "1", "0", "0", "2", r"- \infty"]).split()]
            out += ["_", *_braced(lo), "^", *_braced(SUM_UPPER.pick(rng))]
        elif r < 0.8:
            out += ["_", *_braced(i)]
        elif r < 0.95:
            rel = rng.choice([r"\in", r"\in", r"\in", r"\neq", ","])
            what = self.letter() if rel != r"\in" else list(UPPER.pick(rng)) if self.chance(0.6) \
                else [rng.choice([r"\mathbb", r"\mathcal"]), *_braced(UPPER.pick(rng))]
            out += ["_", *_braced(i + [rel] + what)]
        elif r < 0.97:  # \substack: the normalizer turns its line break into \,
            j = list(self.indices[1])
            out += ["_", "{", r"\substack", *_braced(i + [r"\in", *UPPER.pick(rng), r"\,"] + i +
                                                     [r"\neq"] + j), "}"]
        room = limit - len(out)
        if room < 1:
            return None
        return out + self.product(max(1, hint - len(out)), depth + 1, room, number=False)

    def t_group(self, hint, depth, limit):
        """( a + b ) ^ { 2 }, \\left( \\frac { a } { b } \\right), \\Big [ x \\Big ]."""
        rng, cfg = self.rng, self.cfg
        if self.chance(cfg.p_tuple):  # ( x , y ), [ 0 , T ]
            inner = self.args(depth, min(limit - 4, max(7, hint)), at_least=2)
        else:
            inner = self.expr(max(1, hint - 2), depth + 1, limit - 4)
        if self.chance(cfg.p_sized):
            size = SIZE.pick(rng)[0]
            o, c = _pair(SIZED_PAIR, rng)
            if self.chance(0.25):
                open_, close = [size + "l", o], [size + "r", c]  # \bigl ( ... \bigr )
            else:
                open_, close = [size, o], [size, c]
        else:
            tall = any(t in TALL for t in inner)
            o, c = _pair(LEFT_PAIR if self.chance(cfg.p_left_right * (2 if tall else 0.5))
                         else PLAIN_PAIR, rng)
            open_, close = [o], [c]
        out = open_ + inner + close
        if _wrapped(inner):  # ( ( a + b ) ): keep the inner group only
            out = inner
        if limit - len(out) >= 4:
            if self.chance(0.22) or (o == r"\left." and self.chance(0.8)):
                out += ["^", *_braced(self.script(SUP, depth, limit - len(out) - 3))]
            elif self.chance(0.06):
                out += ["_", *_braced(self.script(SUB, depth, limit - len(out) - 3))]
        return out

    def t_delim(self, hint, depth, limit):
        """| x |, \\| u \\| _ { 2 }, \\langle \\psi | \\phi \\rangle, \\{ x \\in X \\mid x > 0 \\}."""
        rng = self.rng
        o, c = _pair(ABS_PAIR, rng)
        inner = self.expr(max(1, min(hint - 2, 6)), depth + 1, limit - 2)
        if o == r"\langle" and len(inner) + 4 <= limit and self.chance(0.4):
            inner += [rng.choice(["|", ","])] + self.scripted(self.letter(), depth + 1,
                                                               limit - len(inner) - 3)
        elif o == r"\{" and len(inner) + 6 <= limit and self.chance(0.5):  # set-builder
            inner += [rng.choice([r"\mid", r"\mid", ":", r"\colon"])] + self.letter() + list(
                RELATION.pick(rng)) + self.letter()
        out = [o, *inner, c]
        if o == r"\|" and limit - len(out) >= 8 and self.chance(0.4):
            out += ["_", *_braced(rng.choice(["2", "2", "1", r"\infty", "p", "L ^ { 2 }"]).split())]
        elif limit - len(out) >= 4 and self.chance(0.12):
            out += ["^", "{", "2", "}"]
        return out if len(out) <= limit else None

    def t_deriv(self, hint, depth, limit):
        """\\partial _ { \\mu } A, \\frac { \\partial f } { \\partial x }, d x, \\nabla \\cdot u."""
        rng = self.rng
        r = rng.random()
        if r < 0.3:
            return self.scripted([r"\partial"], depth + 1, limit, p_sub=0.8, p_sup=0.1)
        if r < 0.6:
            d = "d" if self.chance(0.25) else r"\partial"
            order = ["^", "{", "2", "}"] if self.chance(0.2) else []
            top = [d, *order] + (self.letter() if self.chance(0.6) else [])
            bottom = [d, *self.letter(), *order]
            return [r"\frac", *_braced(top), *_braced(bottom)]
        if r < 0.88:
            d = list(self.d)
            return d + self.scripted(self.letter(), depth + 1, limit - len(d), p_sup=0.05)
        return [rng.choice([r"\nabla", r"\nabla", r"\Delta", r"\partial"])] + (
            [r"\cdot"] if self.chance(0.3) else []) + self.letter()

    def grid(self, rows: int, cols: int, depth: int, limit: int) -> list[str] | None:
        """{ a } & { b } \\\\ { c } & { d } \\\\ -- cells braced, every row ends with \\\\."""
        out: list[str] = []
        per_cell = max(3, (limit - rows * cols) // (rows * cols))
        dots_row = 1 if rows == 3 and self.chance(0.3) else -1  # { a _ { 1 } } \\ { \vdots } \\
        for row in range(rows):
            for j in range(cols):
                if j:
                    out.append("&")
                out += _braced([r"\vdots"] if row == dots_row else
                               self.expr(self.rng.randint(1, 5), depth + 1, per_cell - 2))
            out.append("\\\\")
        return out if len(out) <= limit else None

    def t_matrix(self, hint, depth, limit):
        rng = self.rng
        rows, cols = rng.choice([(2, 2), (2, 2), (3, 3), (2, 1), (3, 1), (1, 3), (2, 3), (4, 4)])
        if self.chance(0.6):
            begin, end = ["\\begin{matrix}"], ["\\end{matrix}"]
        else:
            spec = ([ALIGN.pick(rng)[0]] * cols if self.chance(0.7)
                    else [ALIGN.pick(rng)[0] for _ in range(cols)])
            begin, end = ["\\begin{array}", *_braced(spec)], ["\\end{array}"]
        o, c = rng.choice([(r"\left(", r"\right)"), (r"\left(", r"\right)"),
                           (r"\left[", r"\right]"), (r"\left|", r"\right|")])
        body = self.grid(rows, cols, depth, limit - 4 - len(begin))
        return [o, *begin, *body, *end, c] if body else None

    def t_cases(self, hint, depth, limit):
        """\\left\\{ \\begin{array} { l l } { value } & { \\mathrm { i f ~ } x > 0 } \\\\ ... \\right."""
        rng = self.rng
        rows = 2 if self.chance(0.75) else 3
        body: list[str] = []
        per_row = max(12, (limit - 10) // rows)
        for i in range(rows):
            value = self.expr(rng.randint(1, 8), depth + 1, per_row // 2)
            if i == rows - 1 and self.chance(0.4):
                cond = [TEXT_FONT.pick(rng)[0], *_braced("o t h e r w i s e".split())]
            else:
                cond = (self.text(CONDITION_WORD) if self.chance(0.6) else []) + self.expr(
                    2, depth + 1, 3) + list(RELATION.pick(rng)) + self.expr(2, depth + 1, 3)
            body += [*_braced(value), "&", *_braced(cond), "\\\\"]
        if self.chance(0.45):
            begin, end = ["\\begin{cases}"], ["\\end{cases}"]
        else:
            begin, end = ["\\begin{array}", "{", "l", "l", "}"], ["\\end{array}"]
        out = [r"\left\{", *begin, *body, *end, r"\right."]
        return out if len(out) <= limit else None

    def t_misc(self, hint, depth, limit):
        """Rarer constructs that still occur in papers."""
        rng = self.rng
        r = rng.random()

        def small():
            return self.expr(rng.randint(1, 3), depth + 1, 4)

        if r < 0.2:
            return [r"\binom", *_braced(small()), *_braced(small())]
        if r < 0.3:
            return [r"\xrightarrow", *_braced(small())]
        if r < 0.45:
            return [r"\underbrace", *_braced(self.expr(rng.randint(3, 8), depth + 1, 10)),
                    "_", *_braced(small())]
        if r < 0.6:
            return [rng.choice([r"\overset", r"\underset", r"\stackrel"]), *_braced(small()),
                    *_braced(list(RELATION.pick(rng)) if self.chance(0.5) else self.letter())]
        if r < 0.7:
            op = self.t_bigop(hint, depth, limit - 1)
            return [r"\displaystyle", *op] if op else None
        if r < 0.85:  # old-style font switches
            font = rng.choice([r"\cal", r"\cal", r"\bf", r"\bf", r"\sf", r"\it"])
            inner = CAL_LETTER.pick(rng) if font == r"\cal" else self.letter()
            return ["{", font, *inner, "}"]
        if r < 0.93:
            return self.text(WORDS) + self.letter()
        return [rng.choice([r"\forall", r"\exists", r"\neg"])] + self.letter()


def sample_length(rng: random.Random, cfg: SynthConfig) -> int:
    """A target length: gamma(shape, mean) redrawn while above max_tokens (no pile-up there)."""
    while True:
        x = rng.gammavariate(cfg.length_shape, cfg.mean_tokens / cfg.length_shape)
        if x <= cfg.max_tokens:
            return max(int(round(x)), cfg.min_tokens)


def generate_one(rng: random.Random, config: SynthConfig | None = None) -> str:
    """One normalized formula drawn with `rng` (a `random.Random`). Its length is close to a
    length drawn from the config's distribution: of a few candidates the closest is kept."""
    cfg = config or SynthConfig()
    target = sample_length(rng, cfg)
    tolerance = max(2, target // 10)
    best = None
    for attempt in itertools.count(1):
        tokens = _Builder(rng, cfg).formula(target)
        if cfg.min_tokens <= len(tokens) <= cfg.max_tokens and (
                best is None or abs(len(tokens) - target) < abs(len(best) - target)):
            best = tokens
        if best is not None and (attempt >= LENGTH_TRIES or abs(len(best) - target) <= tolerance):
            return " ".join(best)
        if attempt >= 1000:
            raise RuntimeError(f"synth: no formula of {cfg.min_tokens}..{cfg.max_tokens} tokens in "
                               f"1000 tries; lower min_tokens or raise max_tokens ({cfg})")


def generate(n: int, seed: int = 0, config: SynthConfig | None = None,
             unique: bool = True) -> list[str]:
    """`n` formulas, a pure function of (n, seed, config, unique); `generate(m)` is a prefix of
    `generate(n)` for m < n. With `unique`, no formula repeats (raises if the config cannot make
    enough distinct ones)."""
    return list(itertools.islice(iter_formulas(seed, config, unique), n))


def iter_formulas(seed: int = 0, config: SynthConfig | None = None, unique: bool = True):
    """Endless stream of formulas (deduplicated with `unique`)."""
    rng = random.Random(seed)
    config = config or SynthConfig()
    seen: set[str] = set()
    misses = 0
    while True:
        f = generate_one(rng, config)
        if unique:
            if f in seen:
                misses += 1
                if misses > 1000 + len(seen):
                    raise RuntimeError(f"synth: only {len(seen)} distinct formulas after {misses} "
                                       f"repeats; raise mean_tokens/max_tokens or use unique=False")
                continue
            seen.add(f)
        yield f


def _js(p: list[float], q: list[float]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two histograms (normalized here)."""
    sp, sq = sum(p), sum(q)
    p, q = [x / sp for x in p], [x / sq for x in q]
    out = 0.0
    for a, b in zip(p, q):
        m = (a + b) / 2
        out += (a * math.log2(a / m) if a else 0.0) + (b * math.log2(b / m) if b else 0.0)
    return out / 2


def compare_to_corpus(formulas: list[str], corpus: list[str], top: int = 300,
                      bin_width: int = 5) -> dict:
    """How close `formulas` are to a reference `corpus` (both normalized, one formula a string).

    js_lengths: JS divergence of token-length histograms (bins of `bin_width`);
    js_tokens: JS divergence of token frequencies over the corpus' `top` tokens plus one bucket
    for all other tokens; coverage_topN: share of the corpus' top-N tokens that occur at all."""
    syn_tok, ref_tok = Counter(), Counter()
    syn_len, ref_len = [], []
    for f in formulas:
        t = f.split()
        syn_tok.update(t)
        syn_len.append(len(t))
    for f in corpus:
        t = f.split()
        ref_tok.update(t)
        ref_len.append(len(t))
    if not syn_len or not ref_len:
        raise ValueError("compare_to_corpus: need at least one formula on each side")
    bins = max(max(syn_len), max(ref_len)) // bin_width + 1
    hist_s, hist_r = [0] * bins, [0] * bins
    for n in syn_len:
        hist_s[n // bin_width] += 1
    for n in ref_len:
        hist_r[n // bin_width] += 1
    vocab = [t for t, _ in ref_tok.most_common(top)]
    syn_total, ref_total = sum(syn_tok.values()), sum(ref_tok.values())
    p = [syn_tok[t] for t in vocab] + [syn_total - sum(syn_tok[t] for t in vocab)]
    q = [ref_tok[t] for t in vocab] + [ref_total - sum(ref_tok[t] for t in vocab)]
    return {
        "mean_len": statistics.fmean(syn_len), "median_len": statistics.median(syn_len),
        "corpus_mean_len": statistics.fmean(ref_len), "corpus_median_len": statistics.median(ref_len),
        "js_lengths": _js(hist_s, hist_r), "js_tokens": _js(p, q),
        **{f"coverage_top{n}": sum(1 for t in vocab[:n] if syn_tok[t]) / len(vocab[:n])
           for n in (50, 100, 300) if n <= top},
    }



def parse_fields(items: list[str]) -> dict:
    """`FIELD=VALUE` strings -> SynthConfig keyword arguments of the fields' own types; an unknown
    field or a value of the wrong type is a ValueError that names it."""
    types = {f.name: f.type for f in fields(SynthConfig)}
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. w_matrix=6")
        if name not in types:
            close = difflib.get_close_matches(name, list(types), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"--set {item!r}: SynthConfig has no field {name!r}{hint}")
        kind = int if types[name] in ("int", int) else float  # every field is a number
        try:
            out[name] = kind(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: {name} must be a number ({kind.__name__})") from None
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write synthetic formulas (im2markup-normalized LaTeX), one a line.")
    parser.add_argument("-n", type=int, required=True, help="number of formulas")
    parser.add_argument("--seed", type=int, default=0, help="the output is a function of the seed")
    parser.add_argument("-o", "--output", required=True, help="output .txt file (written atomically)")
    parser.add_argument("--max-tokens", type=int, default=SynthConfig.max_tokens,
                        help="hard limit of tokens per formula (default %(default)s)")
    parser.add_argument("--mean-tokens", type=float, default=SynthConfig.mean_tokens,
                        help="mean of the length distribution before truncation at --max-tokens "
                             "(default %(default)s: arXiv-like lengths)")
    parser.add_argument("--max-depth", type=int, default=SynthConfig.max_depth,
                        help="nesting depth of fractions/roots/groups (default %(default)s)")
    parser.add_argument("--unique", action=argparse.BooleanOptionalAction, default=True,
                        help="no repeated formula lines (default on)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="other SynthConfig fields, e.g. --set w_matrix=6 w_cases=4 "
                             "p_aligned=0.2 for the multi-line structures real corpora lack")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("-n must be >= 0")
    try:
        cfg = SynthConfig(max_tokens=args.max_tokens, max_depth=args.max_depth,
                          mean_tokens=args.mean_tokens, **parse_fields(args.set))
    except ValueError as e:
        parser.error(str(e))
    from tqdm import tqdm  # only the command line shows progress

    stream = itertools.islice(iter_formulas(args.seed, cfg, args.unique), args.n)
    try:
        count = atomic_write_lines(args.output, tqdm(stream, total=args.n, unit="formula",
                                               disable=args.n < 10000))
    except (RuntimeError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {count} formulas to {args.output}")


if __name__ == "__main__":
    main()
