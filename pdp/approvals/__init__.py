"""Human approvals: who may decide a pending proposal, quorum, and what happens at quorum."""
