//! What one evaluation records: the steps `portcullis check` explains, and whether it stopped
//! because a step would have had to wait.

use crate::check::{Decision, Denial, Io, Reason, Step, StepResult};

/// Records steps when asked to.
pub(super) struct Evaluation<'d> {
    pub(super) d: &'d mut Decision,
    pub(super) explain: bool,
    /// Whether steps may wait for a fetch.
    pub(super) io: Io,
    /// Set when a step stopped because it would have had to wait: the evaluation has no decision.
    pub(super) would_wait: bool,
    /// What the checks established, for the decision's `dynamic_metadata`.
    pub(super) seen: Seen,
}

/// What passed checks established about the caller (cheap clones of what they hold).
#[derive(Default)]
pub(super) struct Seen {
    /// The validated token.
    pub(super) token: Option<crate::identity::ValidToken>,
    /// The client certificate that matched an identity.
    pub(super) cert: Option<std::sync::Arc<super::cert::ClientCert>>,
    /// The product of the subscription's scope.
    pub(super) product: Option<std::sync::Arc<str>>,
}

impl Evaluation<'_> {
    /// Stops the evaluation without a decision (see [`PolicySet::decide_now`]). The denial it
    /// returns only unwinds the steps; `evaluate` never answers with it.
    pub(super) fn would_wait(&mut self) -> Denial {
        self.would_wait = true;
        Denial::new(Reason::Internal)
    }

    // Details are closures: formatting them costs allocations a normal check must not pay.
    pub(super) fn step(
        &mut self,
        check: &'static str,
        result: StepResult,
        detail: impl FnOnce() -> String,
    ) {
        if self.explain {
            self.d.steps.push(Step {
                check,
                result,
                detail: detail(),
            });
        }
    }

    pub(super) fn pass(&mut self, check: &'static str, detail: impl FnOnce() -> String) {
        self.step(check, StepResult::Pass, detail);
    }

    pub(super) fn skip(&mut self, check: &'static str) {
        self.step(check, StepResult::Skip, || "not configured".into());
    }

    pub(super) fn fail(
        &mut self,
        check: &'static str,
        reason: Reason,
        detail: impl FnOnce() -> String,
    ) {
        self.step(check, StepResult::Fail(reason), detail);
    }

    pub(super) fn deny(
        &mut self,
        check: &'static str,
        reason: Reason,
        detail: impl FnOnce() -> String,
    ) -> Denial {
        self.deny_with(check, Denial::new(reason), detail)
    }

    pub(super) fn deny_with(
        &mut self,
        check: &'static str,
        denial: Denial,
        detail: impl FnOnce() -> String,
    ) -> Denial {
        self.fail(check, denial.reason, detail);
        denial
    }
}
