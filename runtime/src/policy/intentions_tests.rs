use super::*;

fn rule(source: &str, destination: &str, action: Action) -> Change {
    Change::Set(Rule {
        source: source.into(),
        destination: destination.into(),
        action,
    })
}

fn with(changes: Vec<Change>) -> Intentions {
    changes
        .into_iter()
        .try_fold(Intentions::default(), |i, c| i.changed(c))
        .unwrap()
}

#[test]
fn without_rules_the_default_decides() {
    let open = Intentions::default();
    assert_eq!(open.decide("a", "b").action, Action::Allow);
    assert!(open.allows_all());
    let closed = with(vec![Change::Default(Action::Deny)]);
    let d = closed.decide("a", "b");
    assert_eq!((d.action, &d.rule), (Action::Deny, &None));
    assert_eq!(d.reason(), "the cluster default (deny)");
    assert!(!closed.allows_all());
}

#[test]
fn the_most_specific_rule_wins() {
    let i = with(vec![
        rule("*", "*", Action::Deny),
        rule("checkout", "*", Action::Allow),
        rule("*", "payments", Action::Deny),
        rule("checkout", "payments", Action::Allow),
        rule("-", "payments", Action::Allow),
    ]);
    // Exact source and destination.
    assert_eq!(i.decide("checkout", "payments").action, Action::Allow);
    // Any source to an exact destination beats an exact source to any.
    assert_eq!(i.decide("frontend", "payments").action, Action::Deny);
    assert_eq!(i.decide("checkout", "catalog").action, Action::Allow);
    // The anonymous caller is a source like any other.
    assert_eq!(i.decide("-", "payments").action, Action::Allow);
    // Nothing more specific: * -> *.
    let d = i.decide("frontend", "catalog");
    assert_eq!(d.action, Action::Deny);
    assert_eq!(d.reason(), "rule * -> *: deny");
}

#[test]
fn changes_bump_the_version_and_replace_a_pair_s_rule() {
    let i = with(vec![
        rule("a", "b", Action::Deny),
        rule("a", "b", Action::Allow),
    ]);
    assert_eq!(i.version, 2);
    assert_eq!(i.rules.len(), 1);
    assert_eq!(i.decide("a", "b").action, Action::Allow);
    let removed = i
        .changed(Change::Remove {
            source: "a".into(),
            destination: "b".into(),
        })
        .unwrap();
    assert!(removed.rules.is_empty());
    assert!(removed
        .changed(Change::Remove {
            source: "a".into(),
            destination: "b".into()
        })
        .is_err());
}

#[test]
fn bad_names_too_many_rules_and_the_last_version_are_refused() {
    for (source, destination) in [("A", "b"), ("a", "-"), ("a", "b c"), ("", "b")] {
        assert!(
            Intentions::default()
                .changed(rule(source, destination, Action::Allow))
                .is_err(),
            "{source} -> {destination}"
        );
    }
    let full = (0..MAX_RULES).fold(Intentions::default(), |i, n| {
        i.changed(rule(&format!("s{n}"), "b", Action::Deny))
            .unwrap()
    });
    assert!(full.changed(rule("x", "b", Action::Deny)).is_err());
    let last = Intentions {
        version: u64::MAX,
        ..Intentions::default()
    };
    assert!(last.changed(Change::Default(Action::Deny)).is_err());
}

#[test]
fn the_digest_covers_version_default_and_rules() {
    let a = with(vec![rule("a", "b", Action::Deny)]);
    let mut b = a.clone();
    assert_eq!(a.digest(), b.digest());
    b.rules[0].action = Action::Allow;
    assert_ne!(a.digest(), b.digest());
    b = a.clone();
    b.version += 1;
    assert_ne!(a.digest(), b.digest());
}
