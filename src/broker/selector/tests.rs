//! Selector behaviour as a table: expressions that must match or not against one
//! sample message, expressions that must be rejected, and a seeded fuzz showing that
//! no input makes `parse` or `matches` panic.

use super::{parse, Fields, SelectorValue, MAX_DEPTH, MAX_SELECTOR_LEN};

/// The sample message every table row is evaluated against. `missing` is absent.
fn sample(name: &str) -> SelectorValue {
    use SelectorValue as V;
    match name {
        "color" => V::String("red".into()),
        "Color" => V::String("blue".into()),
        "size" => V::Long(10),
        "weight" => V::Double(2.5),
        "flag" => V::Bool(true),
        "off" => V::Bool(false),
        "quote" => V::String("it's".into()),
        "path" => V::String("50%_off".into()),
        "big" => V::Long(i64::MAX),
        "zero" => V::Long(0),
        "nan" => V::Double(f64::NAN),
        "header.priority" => V::Long(7),
        "café" => V::String("crème".into()),
        _ => V::Null,
    }
}

const MATCHES: &[(&str, bool)] = &[
    // Literals and identifiers.
    ("TRUE", true),
    ("FALSE", false),
    ("flag", true),
    ("off", false),
    ("missing", false),
    ("NOT missing", false),
    ("color", false), // a string is not a condition: UNKNOWN
    // Equality and ordering, strings and numbers.
    ("color = 'red'", true),
    ("color <> 'red'", false),
    ("color = 'Red'", false),
    ("Color = 'blue'", true),
    ("quote = 'it''s'", true),
    ("'' = ''", true),
    ("café = 'crème'", true),
    ("size = 10", true),
    ("size <> 10", false),
    ("size > 9", true),
    ("size >= 10", true),
    ("size < 10", false),
    ("size <= 10", true),
    ("size = 10.0", true),
    ("size < 10.5", true),
    ("weight > 2", true),
    ("weight = 2.5", true),
    ("weight = 25e-1", true),
    ("weight = 2.5F", true),
    ("weight = 2.5d", true),
    ("size = 10L", true),
    ("size = 0xA", true),
    ("size = 0XaL", true),
    ("size = 012", true), // octal, as ActiveMQ and Artemis read it
    ("size = 1e1", true),
    ("weight * 2 = 5.", true),
    ("weight = .25e1", true),
    ("big = 9223372036854775807", true),
    ("-big - 1 = -9223372036854775808", true),
    ("flag = TRUE", true),
    ("off = FALSE", true),
    ("flag <> off", true),
    ("(size = 10) = TRUE", true),
    // Type mismatches and unsupported orderings are UNKNOWN.
    ("color = 1", false),
    ("NOT (color = 1)", false),
    ("size = '10'", false),
    ("flag = 1", false),
    ("color < 'z'", false),
    ("NOT (color < 'z')", false),
    ("flag > off", false),
    // NULL semantics.
    ("missing = 1", false),
    ("NOT (missing = 1)", false),
    ("missing <> 1", false),
    ("missing IS NULL", true),
    ("missing IS NOT NULL", false),
    ("color IS NULL", false),
    ("color IS NOT NULL", true),
    ("NULL IS NULL", true),
    ("(missing = 1) IS NULL", true),
    ("missing = missing", false),
    ("NULL = NULL", false),
    ("missing + 1 IS NULL", true),
    ("-missing IS NULL", true),
    // AND / OR / NOT truth tables with UNKNOWN.
    ("flag AND size = 10", true),
    ("flag AND off", false),
    ("missing AND off", false),
    ("NOT (missing AND off)", true),
    ("missing AND flag", false),
    ("NOT (missing AND flag)", false),
    ("missing OR flag", true),
    ("missing OR off", false),
    ("NOT (missing OR off)", false),
    ("off OR off OR flag", true),
    ("flag AND flag AND flag AND off", false),
    ("NOT flag", false),
    ("NOT off", true),
    ("NOT NOT flag", true),
    ("NOT size = 10", false),      // NOT binds looser than =
    ("off AND off OR flag", true), // AND binds tighter than OR
    ("flag OR off AND off", true),
    ("(flag OR off) AND off", false),
    // Arithmetic and its precedence.
    ("1 + 2 * 3 = 7", true),
    ("(1 + 2) * 3 = 9", true),
    ("10 - 2 - 3 = 5", true),
    ("24 / 4 / 2 = 3", true),
    ("7 / 2 = 3", true),
    ("7.0 / 2 = 3.5", true),
    ("-7 / 2 = -3", true),
    ("size * 2 + 1 = 21", true),
    ("-size = -10", true),
    ("+size = 10", true),
    ("- -size = 10", true),
    ("2 - -size = 12", true),
    ("size / zero = 1", false),
    ("NOT (size / zero = 1)", false),
    ("(size / zero) IS NULL", true),
    ("weight / 0.0 IS NULL", true),
    ("big + 1 > 0", true), // overflow falls back to double, no wrap-around
    ("big * 2 > 0", true),
    ("nan = nan", false),
    ("nan <> nan", true),
    ("nan < 1", false),
    // BETWEEN.
    ("size BETWEEN 5 AND 15", true),
    ("size BETWEEN 10 AND 10", true),
    ("size BETWEEN 11 AND 15", false),
    ("size NOT BETWEEN 11 AND 15", true),
    ("size NOT BETWEEN 5 AND 15", false),
    ("weight BETWEEN 2 AND 3", true),
    ("size BETWEEN 2 * 3 AND 5 + 5", true),
    ("size BETWEEN 5 AND 15 AND flag", true),
    ("missing BETWEEN 1 AND 2", false),
    ("missing NOT BETWEEN 1 AND 2", false),
    ("size BETWEEN missing AND 5", false), // FALSE wins over UNKNOWN
    ("size BETWEEN missing AND 15", false),
    ("(size BETWEEN missing AND 15) IS NULL", true),
    ("color BETWEEN 1 AND 2", false),
    // IN.
    ("color IN ('red', 'green')", true),
    ("color IN ('green')", false),
    ("color NOT IN ('green', 'blue')", true),
    ("color NOT IN ('red')", false),
    ("missing IN ('red')", false),
    ("missing NOT IN ('red')", false),
    ("size IN ('10')", false),
    ("quote IN ('it''s')", true),
    // LIKE, with and without ESCAPE.
    ("color LIKE 'red'", true),
    ("color LIKE 'r%'", true),
    ("color LIKE '%d'", true),
    ("color LIKE '%e%'", true),
    ("color LIKE 'r_d'", true),
    ("color LIKE '_'", false),
    ("color LIKE '___'", true),
    ("color LIKE '%'", true),
    ("color LIKE 'R%'", false),
    ("color LIKE 'r%x'", false),
    ("color NOT LIKE 'b%'", true),
    ("color NOT LIKE 'r%'", false),
    ("path LIKE '50!%!_off' ESCAPE '!'", true),
    ("path LIKE '50\\%\\_off' ESCAPE '\\'", true),
    ("path LIKE '50!%%' ESCAPE '!'", true),
    ("path LIKE '5!%%' ESCAPE '!'", false),
    ("path LIKE '%!_%' ESCAPE '!'", true),
    ("path LIKE '%!!%' ESCAPE '!'", false),
    ("color LIKE '%%%d'", true),
    ("café LIKE 'cr_me'", true),
    ("missing LIKE '%'", false),
    ("missing NOT LIKE '%'", false),
    ("size LIKE '1%'", false),
    ("'aXbXc' LIKE 'a%b%c'", true),
    ("'abcabd' LIKE '%abd'", true),
    ("'ab' LIKE 'a%b%'", true),
    // Keywords in any case; identifiers may contain dots.
    ("color = 'red' and size = 10", true),
    ("color = 'red' AnD NoT off", true),
    ("size between 5 and 15", true),
    ("color in ('red') or false", true),
    ("color not like 'x%'", true),
    ("missing is null", true),
    ("missing Is Not Null", false),
    ("true", true),
    ("header.priority = 7", true),
    ("header.priority > size", false),
    // Whitespace of every kind.
    ("\tcolor\n=\r'red'  ", true),
    ("(((color = 'red')))", true),
];

/// Each row must be rejected; the second column is part of the expected message.
const INVALID: &[(&str, &str)] = &[
    ("", "empty"),
    ("   ", "empty"),
    ("(color = 'red'", "expected ')'"),
    ("color = 'red')", "unexpected ')'"),
    ("()", "unexpected ')'"),
    ("color = 'red' garbage", "after the selector"),
    ("color = 'red' 'x'", "after the selector"),
    ("color =", "unexpected end of selector"),
    ("= 1", "unexpected '='"),
    ("color = 'red", "unterminated string"),
    ("color == 'red'", "unexpected '='"),
    ("color != 'red'", "unexpected character"),
    ("size = 1.2.3", "malformed numeric"),
    ("size = 12abc", "malformed numeric"),
    ("size = 0x", "hex literal without digits"),
    ("size = 0x1G", "malformed numeric"),
    ("size = 09", "malformed octal"),
    ("size = 1e", "exponent without digits"),
    ("size = 1e+", "exponent without digits"),
    ("size = 1e999", "out of range"),
    ("size = 9223372036854775808", "out of range"),
    ("size = -9223372036854775809", "out of range"),
    ("size = 99999999999999999999", "out of range"),
    ("size = .", "unexpected character"),
    ("color LIKE 5", "LIKE pattern must be a string literal"),
    ("color LIKE color", "LIKE pattern must be a string literal"),
    ("color LIKE 'a' ESCAPE 'ab'", "exactly one character"),
    ("color LIKE 'a' ESCAPE ''", "exactly one character"),
    ("color LIKE 'a!' ESCAPE '!'", "ends with its escape"),
    ("size LIKE", "LIKE pattern must be a string literal"),
    ("5 LIKE 'a'", "expected a string expression"),
    ("color IN ()", "IN list item must be a string literal"),
    ("color IN ('a',)", "IN list item must be a string literal"),
    ("color IN ('a' 'b')", "expected ')' or ','"),
    ("color IN 'a'", "expected '(' after IN"),
    ("color IN (1, 2)", "IN list item must be a string literal"),
    ("size BETWEEN 1", "expected AND in BETWEEN"),
    ("size BETWEEN 1 OR 2", "expected AND in BETWEEN"),
    ("size BETWEEN 'a' AND 'b'", "expected a numeric expression"),
    ("'a' BETWEEN 1 AND 2", "expected a numeric expression"),
    ("size NOT 5", "expected LIKE, IN or BETWEEN after NOT"),
    ("size NOT", "expected LIKE, IN or BETWEEN after NOT"),
    ("size IS 5", "expected NULL after IS"),
    ("size IS NOT 5", "expected NULL after IS"),
    ("size IS NOT NOT NULL", "expected NULL after IS"),
    ("'a' + 1 = 2", "expected a numeric expression"),
    ("1 + TRUE = 2", "expected a numeric expression"),
    ("-'a' = 1", "expected a numeric expression"),
    ("-(size = 1) = 1", "expected a numeric expression"),
    ("1 AND flag", "expected a boolean expression"),
    ("flag OR 'x'", "expected a boolean expression"),
    ("NOT 5", "expected a boolean expression"),
    ("1 + 2", "expected a boolean expression"),
    ("'red'", "expected a boolean expression"),
    ("10", "expected a boolean expression"),
    ("AND", "unexpected AND"),
    ("color = 'red' AND", "unexpected end of selector"),
    ("NOT", "unexpected end of selector"),
    ("size = ,", "unexpected ','"),
    ("#", "unexpected character"),
];

#[test]
fn valid_selectors_match_as_specified() {
    let mut failures = Vec::new();
    for &(text, expected) in MATCHES {
        match parse(text) {
            Ok(sel) if sel.matches(&sample) == expected => {}
            Ok(_) => failures.push(format!("{text:?}: expected matches = {expected}")),
            Err(e) => failures.push(format!("{text:?}: unexpected error {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invalid_selectors_are_rejected_with_a_reason() {
    let mut failures = Vec::new();
    for &(text, reason) in INVALID {
        match parse(text) {
            Ok(_) => failures.push(format!("{text:?}: parsed, expected error {reason:?}")),
            Err(e) if e.message.contains(reason) && e.position <= text.len() => {}
            Err(e) => failures.push(format!("{text:?}: got {e:?}, expected {reason:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn errors_point_at_the_offending_token() {
    let e = parse("(color = 'red' AND flag").err();
    assert!(
        matches!(&e, Some(e) if e.position == 23 && e.to_string() == "expected ')', found end of selector at 23")
    );
    let e = parse("color = 'red' garbage").err();
    assert!(matches!(&e, Some(e) if e.position == 14));
    let e = parse("a = 'unterminated").err();
    assert!(matches!(&e, Some(e) if e.position == 4));
}

#[test]
fn nesting_is_bounded() {
    let ok_depth = MAX_DEPTH - 2;
    let nested = |n: usize| format!("{}flag{}", "(".repeat(n), ")".repeat(n));
    assert!(parse(&nested(ok_depth)).is_ok());
    let e = parse(&nested(MAX_DEPTH + 1)).err();
    assert!(matches!(&e, Some(e) if e.message.contains("nested deeper")));

    let nots = |n: usize| format!("{}flag", "NOT ".repeat(n));
    // An even number of NOTs keeps TRUE, an odd one flips it.
    for (n, expected) in [
        (ok_depth - 1, ok_depth & 1 != 0),
        (ok_depth, ok_depth & 1 == 0),
    ] {
        assert!(parse(&nots(n)).is_ok_and(|s| s.matches(&sample) == expected));
    }
    assert!(parse(&nots(MAX_DEPTH + 1)).is_err());
    assert!(parse(&format!("{}size = 10", "-".repeat(MAX_DEPTH + 1))).is_err());

    // A left-deep arithmetic chain is as deep as it is long.
    let sum = |n: usize| format!("size{} > 0", " + 1".repeat(n));
    assert!(parse(&sum(ok_depth)).is_ok_and(|s| s.matches(&sample)));
    assert!(parse(&sum(MAX_DEPTH + 1)).is_err());

    // A long OR chain is flat, so it is fine however long.
    let many = (0..250)
        .map(|i| format!("size = {i}"))
        .collect::<Vec<_>>()
        .join(" OR ");
    assert!(many.len() < MAX_SELECTOR_LEN);
    assert!(parse(&many).is_ok_and(|s| s.matches(&sample)));
}

#[test]
fn length_is_bounded() {
    let at_limit = format!("color = '{}'", "x".repeat(MAX_SELECTOR_LEN - 10));
    assert_eq!(at_limit.len(), MAX_SELECTOR_LEN);
    assert!(parse(&at_limit).is_ok_and(|s| !s.matches(&sample)));
    let over = format!("{at_limit} ");
    let e = parse(&over).err();
    assert!(
        matches!(&e, Some(e) if e.position == MAX_SELECTOR_LEN && e.message.contains("longer than"))
    );
}

#[test]
fn selector_keeps_its_text() {
    let sel = parse("color = 'red'");
    assert!(sel.is_ok_and(|s| s.as_str() == "color = 'red'"));
}

#[test]
fn fields_are_looked_up_by_exact_name() {
    let seen = std::cell::RefCell::new(Vec::new());
    let fields = |name: &str| {
        seen.borrow_mut().push(name.to_owned());
        SelectorValue::Null
    };
    let sel = parse("Color IS NULL AND header.x IS NULL");
    assert!(sel.is_ok_and(|s| s.matches(&fields)));
    assert_eq!(*seen.borrow(), ["Color", "header.x"]);
}

/// xorshift64*: deterministic, so a failure reproduces from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random token soup and random mutations of the valid table: never a panic, and
/// whatever parses evaluates (also against a message where every field is present).
#[test]
fn random_input_never_panics() {
    const PIECES: &[&str] = &[
        "color",
        "size",
        "weight",
        "missing",
        "flag",
        "nan",
        "big",
        "'red'",
        "'it''s'",
        "'",
        "1",
        "0",
        "-",
        "+",
        "*",
        "/",
        "=",
        "<>",
        "<",
        ">=",
        "(",
        ")",
        "(",
        ")",
        ",",
        "AND",
        "OR",
        "NOT",
        "IN",
        "LIKE",
        "ESCAPE",
        "'!'",
        "BETWEEN",
        "IS",
        "NULL",
        "TRUE",
        "0x7f",
        "1.5e3",
        ".5",
        "9223372036854775808",
        "'%_'",
        " ",
        "é",
        "\u{0}",
        "#",
        "e",
        ".",
    ];
    let everything = |name: &str| match name.len() % 4 {
        0 => SelectorValue::Long(name.len() as i64 - 3),
        1 => SelectorValue::Double(name.len() as f64 / 3.0),
        2 => SelectorValue::String(name.to_owned()),
        _ => SelectorValue::Bool(name.contains('a')),
    };
    let seed = 0x5EED_CAFE_F00D_u64;
    let mut rng = Rng(seed);
    let mut parsed = 0;
    for i in 0..20_000 {
        let text = if i % 2 == 0 {
            (0..rng.below(12) + 1)
                .map(|_| PIECES[rng.below(PIECES.len())])
                .collect::<Vec<_>>()
                .join(if rng.below(2) == 0 { " " } else { "" })
        } else {
            let mut chars: Vec<char> = MATCHES[rng.below(MATCHES.len())].0.chars().collect();
            for _ in 0..rng.below(3) + 1 {
                let at = rng.below(chars.len() + 1);
                match rng.below(3) {
                    0 if at < chars.len() => {
                        chars.remove(at);
                    }
                    1 => chars.insert(at, char::from(b" ()'%_-+*/=<>!,.0eE9x"[rng.below(21)])),
                    _ => chars.insert(at, char::from_u32(rng.below(0x3000) as u32).unwrap_or('?')),
                }
            }
            chars.into_iter().collect()
        };
        if let Ok(sel) = parse(&text) {
            parsed += 1;
            let _ = sel.matches(&sample);
            let _ = sel.matches(&everything);
        }
    }
    // The generator must exercise the evaluator too, not only the error paths.
    assert!(
        parsed > 1_000,
        "seed {seed:#x}: only {parsed} inputs parsed"
    );
}

#[test]
fn fields_trait_objects_work() {
    struct Empty;
    impl Fields for Empty {
        fn get(&self, _: &str) -> SelectorValue {
            SelectorValue::Null
        }
    }
    assert!(parse("x IS NULL").is_ok_and(|s| s.matches(&Empty)));
}
