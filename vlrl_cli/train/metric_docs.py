"""What every key of metrics.jsonl means: docs/metrics.md is generated from this table (scripts/make_docs.py),
and a test checks that a run emits exactly the documented keys."""

# key -> (which runs emit it, meaning). "gpu": only where a GPU is present; "engine ranks": only with
# rollout.engine_ranks (tests/test_rollout_ranks.py checks those).
METRICS: dict[str, tuple[str, str]] = {
    "step": ("grpo, sft", "optimizer step, 1-based (GRPO's ppo_epochs count as one)"),
    "reward_mean": ("grpo", "mean reward of this step's samples, over all ranks"),
    "accuracy": ("grpo", "share of samples the environment graded correct"),
    "format_rate": ("grpo", "share of samples in the answer format the environment expects"),
    "response_len_mean": ("grpo", "generated tokens per sample (all turns)"),
    "prompt_len_mean": ("grpo", "prompt tokens per sample"),
    "entropy": ("grpo", "mean -log p of the sampled tokens under the policy being trained, over every PPO epoch (an estimate of its entropy)"),
    "kl": ("grpo", "k3 KL to the reference, per trained token, over every PPO epoch (null without algorithm.kl_coef)"),
    "clip_frac": ("grpo", "share of trained tokens whose PPO ratio was clipped, over every PPO epoch (0 in the first epoch: the anchor is the policy)"),
    "grad_norm": ("grpo, sft", "global gradient norm before clipping (the last epoch's)"),
    "drift_abs_mean": ("grpo", "mean |log p_trainer - log p_engine| of the sampled tokens (the policy as it sampled): engine/trainer agreement"),
    "drift_abs_max": ("grpo", "the largest such difference this step"),
    "is_ratio_mean": ("grpo", "mean p_trainer / p_engine of the sampled tokens"),
    "groups_kept": ("grpo", "groups left after dynamic sampling"),
    "trained_sequences": ("grpo", "sequences the step trained on, all ranks"),
    "prompts_too_long": ("grpo, sft", "prompts over data.max_prompt_tokens, not rolled out or trained"),
    "env_errors": ("grpo", "episodes whose environment failed (raised, or returned what cannot be used); their groups "
                   "are not trained, and env_errors.jsonl in the run directory says why, per record"),
    "padding_frac": ("grpo, sft", "share of the positions the trainer's forwards computed that were padding"),
    "micro_batches": ("grpo, sft", "forwards per pass over the step's batch (this rank)"),
    "time_generate_s": ("grpo", "seconds of the generate phase: the engine, environments, rewards, observations "
                        "(with `rollout.engine_ranks`: the time this trainer waited for its rollouts)"),
    "weights_sent_mb": ("grpo, engine ranks", "MiB of weights trainer 0 sent to the engine ranks after this step's update ("
                        "only what training changes: with LoRA the adapted layers, merged)"),
    "rollout_staleness": ("grpo", "how many updates behind the weights that generated this step's rollouts were "
                          "(0 on-policy; at most `rollout.max_staleness`)"),
    "time_generate_engine_s": ("grpo", "of which inside the engine's generate calls"),
    "time_generate_wake_s": ("grpo", "of which waking the engine (vllm: mapping its weights and KV cache back)"),
    "time_generate_sleep_s": ("grpo", "of which putting it to sleep"),
    "time_score_s": ("grpo", "seconds building the micro-batches and scoring the PPO anchor and the KL reference"),
    "time_train_s": ("grpo, sft", "seconds of the training phase (SFT: the whole step)"),
    "time_sync_s": ("grpo", "seconds pushing the new weights into the engine"),
    "time_step_s": ("grpo", "seconds of the whole step"),
    "tokens_per_s": ("grpo", "generated tokens per second per rank, over the whole step"),
    "lr": ("grpo, sft", "the learning rate of this step"),
    "val_accuracy": ("grpo", "greedy accuracy on data.val (every trainer.eval_every steps)"),
    "val_reward_mean": ("grpo", "mean reward on data.val (every trainer.eval_every steps)"),
    "loss": ("sft", "cross-entropy per trained token"),
    "tokens": ("sft", "trained tokens, all ranks"),
    "trainer_mem_peak_gb": ("grpo, sft; gpu", "the trainer's own peak (scoring, training, sync): PyTorch's peak minus the rollout engine's pool"),
    "engine_mem_gb": ("grpo; gpu", "the rollout engine's allocation (vLLM: weights and KV cache), reported apart"),
    "trainer_mem_held_gb": ("grpo; gpu", "what the trainer holds while the engine generates (weights, optimizer state)"),
}
