use super::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// Every schedule of every shape checks (each micro-batch forwarded and backwarded once per
/// virtual stage, no deadlock), and the ideal run's bubble is the closed form where there is one.
#[test]
fn every_schedule_is_complete_and_runs_to_the_end() {
    for p in [1, 2, 3, 4] {
        for m in [p, 2 * p, 8] {
            let g = Schedule::new(ScheduleKind::GPipe, p, 1, m).unwrap();
            let f = Schedule::new(ScheduleKind::OneFOneB, p, 1, m).unwrap();
            for s in [&g, &f] {
                let b = s.simulate(Costs { forward: 1.0, backward_input: 1.0, backward_weight: 1.0 }).unwrap().bubble();
                assert!(close(b, s.bubble_theory()), "{} p={p} m={m}: {b} vs {}", s.kind.name(), s.bubble_theory());
            }
            if m.is_multiple_of(p) && p > 1 {
                let i = Schedule::new(ScheduleKind::Interleaved, p, 2, m).unwrap();
                let b = i.simulate(Costs::IDEAL).unwrap().bubble();
                assert!(close(b, i.bubble_theory()), "interleaved p={p} m={m}: {b} vs {}", i.bubble_theory());
                assert!(b < f.simulate(Costs::IDEAL).unwrap().bubble(), "interleaved p={p} m={m} beats 1f1b");
            }
            let z = Schedule::new(ScheduleKind::Zbv, p, 2, m).unwrap();
            let (bz, bf) = (z.simulate(Costs::IDEAL).unwrap().bubble(), f.simulate(Costs::IDEAL).unwrap().bubble());
            if p > 1 {
                assert!(bz < bf, "zbv p={p} m={m}: bubble {bz} against 1f1b's {bf}");
            }
        }
    }
}

/// 1F1B holds at most pp micro-batches' activations on a stage; GPipe's grow with the micro-batch
/// count; zbv's stay within 1F1B's.
#[test]
fn one_f_one_b_bounds_the_activations_by_the_stage_count() {
    let (p, m) = (4, 16);
    let f = Schedule::new(ScheduleKind::OneFOneB, p, 1, m).unwrap().peak_activations();
    let g = Schedule::new(ScheduleKind::GPipe, p, 1, m).unwrap().peak_activations();
    let z = Schedule::new(ScheduleKind::Zbv, p, 2, m).unwrap().peak_activations();
    assert_eq!(f, vec![4.0, 3.0, 2.0, 1.0]);
    assert!(g.iter().all(|&x| x == m as f64), "{g:?}");
    assert!(z.iter().all(|&x| x <= p as f64), "{z:?}");
}

/// A schedule that cannot finish is refused, naming where it is stuck; so are shapes the spec
/// cannot run, by field.
#[test]
fn bad_schedules_and_shapes_are_refused() {
    let mut s = Schedule::new(ScheduleKind::OneFOneB, 2, 1, 2).unwrap();
    // Rank 0 waits for a gradient before the forward that produces it was sent.
    s.ranks[0] = vec![bwd(0, 0), fwd(0, 0), fwd(1, 0), bwd(1, 0)];
    assert!(s.check().unwrap_err().to_string().contains("deadlocks"));
    s.ranks[0] = vec![fwd(0, 0), bwd(0, 0), fwd(1, 0)];
    assert!(s.check().unwrap_err().to_string().contains("exactly once"));
    let field = |e: Error| match e {
        Error::Unsupported { field, .. } => field,
        other => panic!("{other}"),
    };
    assert_eq!(field(Schedule::new(ScheduleKind::OneFOneB, 4, 1, 3).unwrap_err()), "train.global_batch_size");
    assert_eq!(field(Schedule::new(ScheduleKind::Zbv, 4, 3, 8).unwrap_err()), "parallel.pp_chunks");
    assert_eq!(field(Schedule::new(ScheduleKind::Interleaved, 4, 2, 6).unwrap_err()), "train.global_batch_size");
    assert_eq!(field(ScheduleKind::parse("pipedream").unwrap_err()), "parallel.pp_schedule");
}

/// The timeline prints one line per rank, passes in order, idle time as dots.
#[test]
fn a_timeline_prints_each_rank_s_passes() {
    let s = Schedule::new(ScheduleKind::OneFOneB, 2, 1, 2).unwrap();
    let text = s.simulate(Costs { forward: 1.0, backward_input: 0.5, backward_weight: 0.5 }).unwrap().render(0.5);
    assert_eq!(text, "rank  0 |F0F1..B0..B1|\nrank  1 |..F0B0F1B1|\n", "{text}");
}

/// The ideal bubbles at pp = 4 with 8 micro-batches, and the timelines, for `docs/parallel.md`
/// (`cargo test -p gantry-engine --lib pipeline -- --nocapture`).
#[test]
fn ideal_bubbles_at_pp_4() {
    let mut last = 1.0;
    for (kind, v) in [(ScheduleKind::GPipe, 1), (ScheduleKind::OneFOneB, 1), (ScheduleKind::Interleaved, 2), (ScheduleKind::Zbv, 2)] {
        let s = Schedule::new(kind, 4, v, 8).unwrap();
        let t = s.simulate(Costs::IDEAL).unwrap();
        eprintln!(
            "{}: bubble {:.3} (theory {:.3}), peak activations {:?}\n{}",
            kind.name(),
            t.bubble(),
            s.bubble_theory(),
            s.peak_activations(),
            t.render(0.5)
        );
        assert!(t.bubble() <= last + 1e-12, "{} does not have a smaller bubble than the schedule before", kind.name());
        last = t.bubble();
    }
}
