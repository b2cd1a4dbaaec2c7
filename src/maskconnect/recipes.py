"""Training recipes (torch-free, so ``maskconnect --help`` stays quick)."""

# Recipes: the paper's protocol (design.md section 6) and short ones for the demo and tests.
# Milestones are fractions of the run's epochs (the paper's 150/225 of 300 are 0.5/0.75), so a
# shortened run keeps the shape of the schedule; ``--milestones`` sets absolute epochs instead.
# ``mask_rule`` is how the real-valued masks are updated (connectivity.MASK_RULES). Every recipe uses
# ``projected``, chosen by measurement (docs/mask_rules.md); ``--mask-rule clip`` reruns the literal reading.
RECIPES: dict[str, dict] = {
    "paper": dict(epochs=300, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, milestone_fracs=[0.5, 0.75], mask_rule="projected"),
    # ImageNet: the ResNeXt recipe (fb.resnet.torch): batch 256, LR 0.1 divided by 10 three times.
    # The paper gives no epoch count; we use 100 with drops at 30/60/90 (our choice).
    "paper-imagenet": dict(epochs=100, batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4, milestone_fracs=[0.3, 0.6, 0.9], mask_rule="projected"),
    # Embedded default (digits, 2-core CPU): a few seconds an epoch.
    "demo": dict(epochs=10, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, milestone_fracs=[0.5, 0.75], mask_rule="projected"),
    # Tests and CI smoke runs.
    "smoke": dict(epochs=2, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4, milestone_fracs=[0.5, 0.75], mask_rule="projected"),
}
