//! The end of a seed's traffic, the same in every world.

use hdrhistogram::Histogram;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::report::new_histogram;

/// Waits until `until`, then for every fault task (each heals what it
/// broke), then stops the writers and readers and collects them: the
/// readers' staleness merged, or the first task that failed.
pub(crate) async fn finish(
    until: Instant,
    faults: Vec<JoinHandle<anyhow::Result<()>>>,
    stop: &CancellationToken,
    writers: Vec<JoinHandle<()>>,
    readers: Vec<JoinHandle<Histogram<u64>>>,
) -> anyhow::Result<Histogram<u64>> {
    sleep_until(until).await;
    let mut result = Ok(());
    for f in faults {
        match f.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(anyhow::anyhow!("fault task failed: {e}")),
        }
    }
    stop.cancel();
    for w in writers {
        if let Err(e) = w.await {
            result = Err(anyhow::anyhow!("writer task failed: {e}"));
        }
    }
    let mut staleness = new_histogram();
    for r in readers {
        match r.await {
            // Same bounds: adding cannot fail.
            Ok(h) => drop(staleness.add(h)),
            Err(e) => result = Err(anyhow::anyhow!("reader task failed: {e}")),
        }
    }
    result.map(|()| staleness)
}
