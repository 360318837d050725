//! Supervision that restarts (DESIGN section 2).
//!
//! actix's `Supervisor` restarts an actor when its context stops, but a
//! panic in a handler never stops the context: it unwinds out of the
//! arbiter's task and the actor is silently gone. So every handler body of
//! weft's four actors runs inside [`guard`]: a panic is caught there, logged,
//! counted in `weft_actor_restarts_total{actor}`, and the actor is stopped,
//! so its `Supervisor` restarts it; each actor's `restarting` rebuilds its
//! state from its sources (the registrations, the gossip view). Connection
//! tasks never run inside an actor, so traffic goes on meanwhile.

use std::panic::{catch_unwind, AssertUnwindSafe};

use actix::{Actor, ActorContext, Context, Message};

/// An actor's name, the `actor` label of `weft_actor_restarts_total`.
pub trait Named {
    /// E.g. `"router"`.
    const NAME: &'static str;
}

/// Runs one handler body. On a panic: logs it, counts the restart, stops
/// the actor (its `Supervisor` restarts it) and returns `None`.
pub fn guard<A, R>(
    actor: &mut A,
    ctx: &mut Context<A>,
    body: impl FnOnce(&mut A, &mut Context<A>) -> R,
) -> Option<R>
where
    A: Actor<Context = Context<A>> + Named,
{
    match catch_unwind(AssertUnwindSafe(|| body(actor, ctx))) {
        Ok(result) => Some(result),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "<non-string panic>".to_string());
            tracing::error!(actor = A::NAME, panic = %message, "actor panicked; restarting it");
            metrics::counter!("weft_actor_restarts_total", "actor" => A::NAME).increment(1);
            ctx.stop();
            None
        }
    }
}

/// Panics inside the actor's handler, to prove the restart (sent only by
/// the fault-injection endpoint a node serves when started with
/// `WEFT_TEST_FAULTS=1`).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Crash;

/// The [`Crash`] handler of a guarded actor.
pub fn crash<A>(actor: &mut A, ctx: &mut Context<A>)
where
    A: Actor<Context = Context<A>> + Named,
{
    guard(actor, ctx, |_, _| {
        panic!("test-induced panic in the {} actor", A::NAME)
    });
}

/// Implements `Handler<Crash>` for a guarded actor; each actor's module
/// invokes it, so this one names none of them.
macro_rules! handle_crash {
    ($actor:ty) => {
        impl actix::Handler<$crate::supervision::Crash> for $actor {
            type Result = ();

            fn handle(&mut self, _msg: $crate::supervision::Crash, ctx: &mut Self::Context) {
                $crate::supervision::crash(self, ctx);
            }
        }
    };
}
pub(crate) use handle_crash;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use actix::{Handler, Supervised, Supervisor};

    use super::*;

    #[derive(Default)]
    struct Counter {
        restarts: u32,
        value: u32,
    }

    impl Actor for Counter {
        type Context = Context<Self>;
    }

    impl Named for Counter {
        const NAME: &'static str = "counter";
    }

    impl Supervised for Counter {
        fn restarting(&mut self, _ctx: &mut Context<Self>) {
            self.restarts += 1;
            self.value = 0;
        }
    }

    #[derive(Message)]
    #[rtype(result = "Option<(u32, u32)>")]
    struct Add(u32);

    impl Handler<Add> for Counter {
        type Result = Option<(u32, u32)>;

        fn handle(&mut self, msg: Add, ctx: &mut Context<Self>) -> Self::Result {
            guard(self, ctx, |this, _| {
                this.value += msg.0;
                (this.value, this.restarts)
            })
        }
    }

    impl Handler<Crash> for Counter {
        type Result = ();

        fn handle(&mut self, _msg: Crash, ctx: &mut Context<Self>) {
            crash(self, ctx);
        }
    }

    #[actix::test]
    async fn a_panicking_handler_restarts_the_actor_with_rebuilt_state() {
        let addr = Supervisor::start(|_| Counter::default());
        assert_eq!(addr.send(Add(2)).await.unwrap(), Some((2, 0)));
        addr.send(Crash).await.unwrap();
        // The same address keeps working, on a restarted actor.
        let after = tokio::time::timeout(Duration::from_secs(5), addr.send(Add(3)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after, Some((3, 1)));
    }
}
