use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use super::*;

fn budget(capacity: usize) -> (MemoryBudget, IntGauge, IntCounter) {
    let held = IntGauge::new("held", "held").expect("gauge");
    let waits = IntCounter::new("waits", "waits").expect("counter");
    (MemoryBudget::new(capacity, held.clone(), waits.clone()), held, waits)
}

/// Whether `future` is still pending after the runtime had a chance to run everything else.
async fn pending<F: std::future::Future + Unpin>(future: &mut F) -> bool {
    tokio::select! {
        biased;
        _ = future => false,
        () = tokio::time::sleep(Duration::from_millis(10)) => true,
    }
}

#[tokio::test(start_paused = true)]
async fn charges_are_counted_shrunk_and_given_back_on_drop() {
    let (budget, held, waits) = budget(1000);
    let mut first = budget.take(300).await;
    let second = budget.take(200).await;
    assert_eq!((first.bytes(), second.bytes()), (300, 200));
    assert_eq!((budget.held(), held.get()), (500, 500));
    first.shrink_to(120);
    assert_eq!((first.bytes(), budget.held(), held.get()), (120, 320, 320));
    first.shrink_to(500);
    assert_eq!(first.bytes(), 120, "a charge never grows");
    drop(first);
    assert_eq!((budget.held(), held.get()), (200, 200));
    drop(second);
    assert_eq!((budget.held(), held.get()), (0, 0));
    assert_eq!(waits.get(), 0, "nothing had to wait");
}

#[tokio::test(start_paused = true)]
async fn a_take_waits_until_enough_is_given_back_and_the_wait_is_counted() {
    let (budget, _, waits) = budget(1000);
    let first = budget.take(800).await;
    let mut second = Box::pin(budget.take(500));
    assert!(pending(&mut second).await, "800 + 500 exceed 1000");
    assert_eq!(waits.get(), 1);
    drop(first);
    let second = second.await;
    assert_eq!((second.bytes(), budget.held()), (500, 500));
}

#[tokio::test(start_paused = true)]
async fn a_page_larger_than_the_budget_takes_the_whole_budget_and_the_next_one_waits() {
    let (budget, _, _) = budget(100);
    let page = budget.take(PAGE_RESERVE).await;
    assert_eq!(page.bytes(), 100, "capped at the budget: one page always fits");
    let mut next = Box::pin(budget.take(PAGE_RESERVE));
    assert!(pending(&mut next).await);
    drop(page);
    assert_eq!(next.await.bytes(), 100);
}

#[tokio::test(start_paused = true)]
async fn first_come_first_served_so_a_large_take_is_not_starved_by_small_ones() {
    let (budget, _, _) = budget(1000);
    let held = budget.take(600).await;
    let mut large = Box::pin(budget.take(900));
    assert!(pending(&mut large).await);
    let mut small = Box::pin(budget.take(200));
    assert!(pending(&mut small).await, "200 would fit, but the large take waits before it");
    drop(held);
    let large = large.await;
    assert!(pending(&mut small).await, "900 + 200 exceed 1000");
    drop(large);
    assert_eq!(small.await.bytes(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_gives_up_and_an_aborted_task_leave_nothing_held() {
    let (budget, held, _) = budget(1000);
    let first = budget.take(1000).await;
    let mut waiting = Box::pin(budget.take(10));
    assert!(pending(&mut waiting).await);
    drop(waiting);
    // A waiter that was handed the bytes given back, and is dropped before it ran, returns them.
    let mut waiting = Box::pin(budget.take(600));
    assert!(pending(&mut waiting).await);
    drop(first);
    assert_eq!(held.get(), 600, "handed to the waiter");
    drop(waiting);
    assert_eq!((budget.held(), held.get()), (0, 0));
    // A prefetch task that took its charge and is dropped (a reader told to stop) gives it back.
    let task = {
        let budget = budget.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            let charge = budget.take(700).await;
            std::future::pending::<()>().await;
            drop(charge);
        }))
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(budget.held(), 700);
    drop(task);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!((budget.held(), held.get()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn unlimited_charges_nothing_and_never_waits() {
    let budget = MemoryBudget::unlimited();
    let charge = budget.take(usize::MAX).await;
    assert_eq!((charge.bytes(), budget.held(), budget.capacity()), (0, 0, None));
}

/// The reader's pattern (take before a fetch; after a full page, a prefetch takes its own charge
/// while the current page is published; the current page's charge is dropped once it is
/// acknowledged) on many readers with a budget smaller than one page: every reader reads every page.
#[tokio::test(start_paused = true)]
async fn readers_with_prefetch_never_deadlock_on_a_budget_smaller_than_a_page() {
    const READERS: usize = 16;
    const PAGES: usize = 20;
    for capacity in [PAGE_RESERVE / 3, PAGE_RESERVE, PAGE_RESERVE * 3 / 2, PAGE_RESERVE * 5] {
        let (budget, held, waits) = budget(capacity);
        let mut readers = JoinSet::new();
        for reader in 0..READERS {
            let budget = budget.clone();
            readers.spawn(async move {
                let fetch = |budget: MemoryBudget| async move {
                    let mut charge = budget.take(PAGE_RESERVE).await;
                    tokio::time::sleep(Duration::from_millis(3 + reader as u64 % 5)).await;
                    charge.shrink_to(PAGE_RESERVE / 2);
                    charge
                };
                let mut current = fetch(budget.clone()).await;
                for page in 1..=PAGES {
                    let prefetch = (page < PAGES).then(|| AbortOnDropHandle::new(tokio::spawn(fetch(budget.clone()))));
                    // Publishing takes no budget.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    drop(current);
                    let Some(prefetch) = prefetch else { return page };
                    current = prefetch.await.expect("prefetch");
                }
                PAGES
            });
        }
        let all = tokio::time::timeout(Duration::from_secs(3600), readers.join_all()).await;
        let pages = all.unwrap_or_else(|_| panic!("readers deadlocked with a budget of {capacity}"));
        assert_eq!(pages, vec![PAGES; READERS]);
        assert_eq!((budget.held(), held.get()), (0, 0), "every charge was given back");
        assert!(waits.get() > 0, "a budget of {capacity} made readers wait");
    }
}
