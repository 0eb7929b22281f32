//! A single-threaded executor for the simulated nodes' tasks. Tasks are
//! polled in the order they were woken, and they are woken only by the
//! simulation's events (a message delivered, a timer fired), so a seed runs
//! the same way every time. A node's tasks are dropped when it crashes,
//! wherever they were waiting.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

type Task = Pin<Box<dyn Future<Output = ()>>>;

struct TaskWaker {
    id: usize,
    ready: Arc<Mutex<VecDeque<usize>>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.ready.lock().expect("ready queue").push_back(self.id);
    }
}

#[derive(Default)]
pub struct Executor {
    /// By task id; `None` once finished or dropped. Ids are never reused, so
    /// a late wake of a dropped task finds nothing.
    tasks: RefCell<Vec<Option<(usize, Task)>>>,
    ready: Arc<Mutex<VecDeque<usize>>>,
}

impl Executor {
    /// Starts `task` on behalf of node `node`.
    pub fn spawn(&self, node: usize, task: impl Future<Output = ()> + 'static) {
        let mut tasks = self.tasks.borrow_mut();
        let id = tasks.len();
        tasks.push(Some((node, Box::pin(task))));
        self.ready.lock().expect("ready queue").push_back(id);
    }

    /// Drops every task of `node` (it crashed).
    pub fn kill(&self, node: usize) {
        for t in self.tasks.borrow_mut().iter_mut() {
            if t.as_ref().is_some_and(|(n, _)| *n == node) {
                *t = None;
            }
        }
    }

    /// Polls woken tasks until none is left to poll; marks the nodes whose
    /// tasks ran in `ran`.
    pub fn run_ready(&self, ran: &mut [bool]) {
        loop {
            let Some(id) = self.ready.lock().expect("ready queue").pop_front() else {
                return;
            };
            // Out of the table while it runs: a task may not spawn or kill
            // (the driver does), but it must not hold the table borrowed.
            let Some((node, mut task)) = self.tasks.borrow_mut()[id].take() else {
                continue;
            };
            ran[node] = true;
            let waker = Waker::from(Arc::new(TaskWaker {
                id,
                ready: self.ready.clone(),
            }));
            if task
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
            {
                self.tasks.borrow_mut()[id] = Some((node, task));
            }
        }
    }
}

/// A value some event will hand to a waiting task.
pub struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

pub type SlotRef<T> = Rc<RefCell<Slot<T>>>;

pub fn slot<T>() -> SlotRef<T> {
    Rc::new(RefCell::new(Slot {
        value: None,
        waker: None,
    }))
}

/// Fills the slot (the first value wins) and wakes its task.
pub fn fill<T>(slot: &SlotRef<T>, value: T) {
    let mut s = slot.borrow_mut();
    if s.value.is_none() {
        s.value = Some(value);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }
}

/// Waits until the slot is filled.
pub struct Filled<T>(pub SlotRef<T>);

impl<T> Future for Filled<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.0.borrow_mut();
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Runs futures side by side; their outputs in order.
pub async fn join_all<T>(futures: Vec<Pin<Box<dyn Future<Output = T> + '_>>>) -> Vec<T> {
    JoinAll {
        futures: futures.into_iter().map(Some).collect(),
        outputs: Vec::new(),
    }
    .await
}

struct JoinAll<'a, T> {
    futures: Vec<Option<Pin<Box<dyn Future<Output = T> + 'a>>>>,
    outputs: Vec<Option<T>>,
}

// The futures are boxed and the outputs are plain values: nothing in here
// is pinned in place.
impl<T> Unpin for JoinAll<'_, T> {}

impl<T> Future for JoinAll<'_, T> {
    type Output = Vec<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<T>> {
        let this = self.get_mut();
        if this.outputs.is_empty() {
            this.outputs = this.futures.iter().map(|_| None).collect();
        }
        for (f, out) in this.futures.iter_mut().zip(this.outputs.iter_mut()) {
            if let Some(fut) = f
                && let Poll::Ready(v) = fut.as_mut().poll(cx)
            {
                *out = Some(v);
                *f = None;
            }
        }
        if this.futures.iter().all(Option::is_none) {
            Poll::Ready(this.outputs.drain(..).map(|o| o.expect("joined")).collect())
        } else {
            Poll::Pending
        }
    }
}
