use super::*;

const MINIMAL: &str = r#"
[model]
path = "m"
[data]
train = "t.bin"
"#;

#[test]
fn defaults_fill_everything_but_model_and_data() {
    let s = JobSpec::from_toml(MINIMAL, &[]).unwrap();
    assert_eq!(s.train.steps, 100);
    assert_eq!(s.micro_batch_size(), 8);
    assert_eq!(s.accumulation_steps(), 1);
    assert_eq!(s.resources.devices, Devices::Cpu(1));
    assert!((s.train.min_lr() - 6e-5).abs() < 1e-12);
}

#[test]
fn unknown_keys_are_named_with_their_path() {
    let err = JobSpec::from_toml(&format!("{MINIMAL}\n[train]\nlearning_rate = 1.0\n"), &[]).unwrap_err();
    assert_eq!(err.field, "train.learning_rate");
    let err = JobSpec::from_json(r#"{"model":{"path":"m","colour":1},"data":{"train":"t"}}"#).unwrap_err();
    assert_eq!(err.field, "model.colour");
}

#[test]
fn bad_values_are_named_with_their_path() {
    let err = JobSpec::from_toml(MINIMAL, &["train.lr=\"fast\"".into()]).unwrap_err();
    assert_eq!(err.field, "train.lr");
    let err = JobSpec::from_toml(MINIMAL, &["train.schedule=exponential".into()]).unwrap_err();
    assert_eq!(err.field, "train.schedule");
    let err = JobSpec::from_toml(MINIMAL, &["resources.devices=gpu:1".into()]).unwrap_err();
    assert_eq!(err.field, "resources.devices");
    let err = JobSpec::from_json(r#"{"model":{"path":"m"}}"#).unwrap_err();
    assert_eq!(err.field, "data");
    let err = JobSpec::from_json(r#"{"model": {"path": "m"},"#).unwrap_err();
    assert_eq!(err.field, "", "a syntax error names no field: {err}");
    assert!(err.message.starts_with("not valid JSON"), "{err}");
    let err = JobSpec::from_json(r#"{"model":{"path":"m"},"data":{"train":"t"},"restart":{"max_restarts":-1}}"#).unwrap_err();
    assert_eq!(err.field, "restart.max_restarts");
    let err = JobSpec::from_json(r#"{"name":"a\u0000b","model":{"path":"m"},"data":{"train":"t"}}"#).unwrap_err();
    assert_eq!(err.field, "name", "{err}");
    assert!(err.message.contains("control character"), "{err}");
    let err = JobSpec::from_json(r#"{"model":{"path":"m\n"},"data":{"train":"t"}}"#).unwrap_err();
    assert_eq!(err.field, "model.path", "{err}");
}

#[test]
fn relations_between_fields_are_checked() {
    let cases = [
        ("train.micro_batch_size=3", "train.global_batch_size"),
        ("train.min_lr=1.0", "train.min_lr"),
        ("train.warmup_steps=1000", "train.warmup_steps"),
        ("parallel.dp=2", "parallel"),
        ("parallel.zero=4", "parallel.zero"),
        ("checkpoint.keep=0", "checkpoint.keep"),
    ];
    for (o, field) in cases {
        let err = JobSpec::from_toml(MINIMAL, &[o.to_string()]).unwrap_err();
        assert_eq!(err.field, field, "{o}: {err}");
        // The message is the check's own, not a complaint about reading the value as text.
        assert!(!err.message.contains("invalid type"), "{o}: {err}");
    }
    let err = JobSpec::from_toml(MINIMAL, &["train.steps=0".into()]).unwrap_err();
    assert!(err.message.contains("at least 1"), "{err}");
    let err = JobSpec::from_toml(MINIMAL, &["train.steps=-3".into()]).unwrap_err();
    assert_eq!(err.field, "train.steps");
    assert!(!err.message.contains("string"), "the literal's own error: {err}");
}

/// The parallel layout's keys: what a layout cannot be is refused naming the field and why.
#[test]
fn parallel_layouts_are_checked_by_field() {
    let with = |sets: &[&str]| JobSpec::from_toml(MINIMAL, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let ok = with(&["resources.devices=cpu:8", "parallel.tp=2", "parallel.dp=2", "parallel.sp=2", "parallel.sp_mode=all_to_all"]).unwrap();
    assert_eq!((ok.parallel.tp, ok.parallel.sp, ok.parallel.sp_mode), (2, 2, SpMode::AllToAll));
    assert_eq!(with(&["resources.devices=cpu:4", "parallel.tp=4", "parallel.tp_mode=\"2d\""]).unwrap().parallel.tp_mode, TpMode::TwoD);
    let pp = with(&[
        "resources.devices=cpu:2",
        "parallel.pp=2",
        "parallel.pp_schedule=\"zbv\"",
        "parallel.pp_layers=[1, 2, 2, 1]",
        "train.micro_batch_size=2",
    ])
    .unwrap();
    assert_eq!((pp.parallel.pp_schedule, pp.parallel.pp_chunks, pp.parallel.pp_layers), (PpSchedule::Zbv, None, Some(vec![1, 2, 2, 1])));
    let cases: [(&[&str], &str, &str); 13] = [
        (&["resources.devices=cpu:2", "parallel.tp=2", "parallel.tp_mode=\"2d\""], "parallel.tp_mode", "not 2"),
        (&["resources.devices=cpu:2", "parallel.dp=2", "parallel.sp_mode=split_gather"], "parallel.sp_mode", "tp > 1"),
        (&["resources.devices=cpu:2", "parallel.sp=2"], "parallel.sp_mode", "all_to_all"),
        (&["parallel.sp_mode=ring_attn"], "parallel.sp", "sp > 1"),
        (&["resources.devices=cpu:2", "parallel.tp=2", "parallel.sp=2", "parallel.sp_mode=ring_attn"], "parallel", "dp × tp × pp × sp = 4"),
        (&["parallel.sp=0"], "parallel.sp", "at least 1"),
        (&["parallel.tp_mode=\"3d\""], "parallel.tp_mode", ""),
        (&["parallel.pp_schedule=\"zbv\"", "parallel.pp_chunks=3"], "parallel.pp_chunks", "exactly 2"),
        (&["parallel.pp_schedule=\"interleaved\"", "parallel.pp_chunks=1"], "parallel.pp_chunks", "2 or more"),
        (&["resources.devices=cpu:2", "parallel.pp=2", "parallel.pp_layers=[3, 3, 2]"], "parallel.pp_layers", "2 stages"),
        (
            &["resources.devices=cpu:2", "parallel.pp=2", "parallel.pp_schedule=\"zbv\"", "parallel.pp_layers=[2, 4]"],
            "parallel.pp_layers",
            "4 virtual stages",
        ),
        (
            &["resources.devices=cpu:8", "parallel.pp=8", "train.micro_batch_size=2"],
            "train.global_batch_size",
            "4 micro-batches for 8 stages",
        ),
        (&["parallel.pp_schedule=\"pipedream\""], "parallel.pp_schedule", ""),
    ];
    for (sets, field, says) in cases {
        let err = with(sets).unwrap_err();
        assert_eq!(err.field, field, "{sets:?}: {err}");
        assert!(err.message.contains(says), "{sets:?}: {err}");
    }
    // The defaults stay out of a stored spec, as before these keys existed.
    let text = JobSpec::from_toml(MINIMAL, &[]).unwrap().to_toml().unwrap();
    assert!(!text.lines().any(|l| l.starts_with("sp") || l.starts_with("tp_mode")), "{text}");
}

#[test]
fn overrides_parse_literals_and_bare_strings() {
    let s = JobSpec::from_toml(
        MINIMAL,
        &["train.lr=3e-4".into(), "resources.devices=cpu:2".into(), "parallel.dp=2".into(), "name=run one".into()],
    )
    .unwrap();
    assert_eq!(s.train.lr, 3e-4);
    assert_eq!(s.resources.devices, Devices::Cpu(2));
    assert_eq!(s.micro_batch_size(), 4);
    assert_eq!(s.name.as_deref(), Some("run one"));
}

#[test]
fn toml_and_json_round_trip_to_the_same_spec() {
    let s = JobSpec::from_toml(MINIMAL, &["train.min_lr=0.0".into()]).unwrap();
    let again = JobSpec::from_toml(&s.to_toml().unwrap(), &[]).unwrap();
    assert_eq!(s, again);
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(JobSpec::from_json(&json).unwrap(), s);
}

#[test]
fn values_the_f32_optimizer_cannot_use_are_refused() {
    for (o, field) in [
        ("train.beta2=0.99999999", "train.beta2"),
        ("train.beta1=0.99999999", "train.beta1"),
        ("train.eps=1e-50", "train.eps"),
        ("train.lr=1e39", "train.lr"),
        ("parallel.dp=4611686018427387904", "train.global_batch_size"),
    ] {
        let err = JobSpec::from_toml(MINIMAL, &[o.to_string()]).unwrap_err();
        assert_eq!(err.field, field, "{o}: {err}");
    }
    let err = JobSpec::from_json(r#"{"model":{"path":"m"},"data":{"train":"t"},"train":{"seed":18446744073709551615}}"#).unwrap_err();
    assert_eq!(err.field, "train.seed");
}

#[test]
fn overrides_that_look_like_numbers_or_dates_fill_string_keys() {
    let s = JobSpec::from_toml(MINIMAL, &["data.train=2024".into(), "name=2024-06-01".into()]).unwrap();
    assert_eq!(s.data.train, "2024");
    assert_eq!(s.name.as_deref(), Some("2024-06-01"));
    assert!(JobSpec::from_toml(MINIMAL, &["train.steps=many".into()]).is_err());
}

#[test]
fn text_after_the_json_document_is_refused() {
    let ok = r#"{"model":{"path":"m"},"data":{"train":"t.bin"}}"#;
    assert!(JobSpec::from_json(ok).is_ok());
    assert!(JobSpec::from_json(&format!("{ok}\n  ")).is_ok(), "trailing whitespace is fine");
    for tail in ["x", "{}", ok] {
        let err = JobSpec::from_json(&format!("{ok}{tail}")).unwrap_err();
        assert_eq!(err.field, "", "{err}");
        assert!(err.message.contains("after the spec"), "{err}");
    }
}

#[test]
fn names_and_paths_are_bounded() {
    let with_name = |n: usize| JobSpec::from_toml(&format!("name = \"{}\"\n{MINIMAL}", "é".repeat(n)), &[]);
    assert!(with_name(MAX_NAME_CHARS).is_ok(), "256 characters (512 bytes) is the limit, in characters");
    let err = with_name(MAX_NAME_CHARS + 1).unwrap_err();
    assert_eq!(err.field, "name");
    assert!(err.message.contains("at most 256"), "{err}");
    let err = JobSpec::from_toml(MINIMAL, &[format!("data.train=\"{}\"", "a".repeat(MAX_PATH_BYTES + 1))]).unwrap_err();
    assert_eq!(err.field, "data.train", "{err}");
    assert!(JobSpec::from_toml(MINIMAL, &[format!("model.path=\"{}\"", "a".repeat(MAX_PATH_BYTES))]).is_ok());
}

#[test]
fn the_documented_example_specs_are_valid() {
    let request = super::example_request();
    let spec = JobSpec::from_json(&request.to_string()).unwrap();
    assert_eq!(JobSpec::from_toml(super::EXAMPLE_TOML, &[]).unwrap(), spec, "the TOML example is the JSON one");
    let stored = super::example_stored();
    assert_eq!(stored["data"]["train"], "/srv/gantry/examples/data/corpus.txt");
    assert_eq!(stored["train"]["beta2"], 0.95, "defaults are filled in: {stored}");
}

#[test]
fn a_toml_syntax_error_names_its_line_and_column() {
    let err = JobSpec::from_toml("name = \"x\"\n\n[model\npath = \"m\"\n", &[]).unwrap_err();
    assert_eq!(err.field, "");
    assert!(err.message.starts_with("not valid TOML at line 3, column "), "{}", err.message);
}
