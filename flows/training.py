"""Training flows: ``distill`` (paper Table 4) and ``finetune-voc`` (the VOC2007 classifier).

``distill``: teacher -> the teacher's maps for each method in use (one task each) -> one student
task per configuration, each starting as soon as its method's maps exist -> Table 4 (table and
markdown artifacts) and ``report.html`` with learning curves. Tasks checkpoint every epoch;
re-running with the same run id resumes every configuration from its last epoch and skips
finished ones. With CUDA each task asks for one ``GPU`` resource.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from tqdm import tqdm

from shapcam.distill.experiment import parse_variants
from tasks.training import (
    distill_table,
    finetune_voc_task,
    student_task,
    table_markdown,
    teacher_maps_task,
    teacher_task,
    write_training_report,
)

from .explain_dataset import _gpu_annotation, _key

teacher_t = task(teacher_task, name="teacher", retries=1, persist_result=False)
maps_t = task(teacher_maps_task, name="teacher_maps", retries=1, persist_result=False)
student_t = task(student_task, name="student", retries=1, persist_result=False)
finetune_t = task(finetune_voc_task, name="finetune", retries=1, persist_result=False)


@flow(name="distill", flow_run_name="distill {spec[dataset]} ({run_id})", log_prints=True)
def distill(run_dir: str, run_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Train the teacher, its maps, and one student per configuration into ``run_dir``.

    ``spec``: dataset, root, limit, seed, teacher, student, teacher_checkpoint, epochs,
    teacher_epochs, schedule (Schedule fields), loss (LossSettings fields), teacher_map_options,
    variants ("all" or "ce,shapcam+kd,..."), device, threads.
    """
    variants = parse_variants(spec.get("variants", "all"))
    methods = sorted({v.method for v in variants if v.method})
    total = 1 + len(methods) + len(variants)
    progress = create_progress_artifact(0.0, key=f"progress-{_key(run_id)}",
                                        description=f"training tasks done of {total}")
    with _gpu_annotation(spec.get("device", "cpu")):
        teacher = teacher_t.with_options(task_run_name=f"teacher {spec.get('teacher', 'wrn-40-2')}"
                                         ).submit(run_dir, run_id, spec)
        maps = {m: maps_t.with_options(task_run_name=f"teacher maps {m}").submit(
            run_dir, run_id, spec, m, wait_for=[teacher]) for m in methods}
        students = [student_t.with_options(task_run_name=f"student {v.name}").submit(
            run_dir, run_id, spec, v.name, wait_for=[maps[v.method] if v.method else teacher])
            for v in variants]
    futures = [teacher, *maps.values(), *students]
    names = {id(f): n for f, n in zip(students, [v.name for v in variants], strict=True)}
    failed: dict[str, str] = {}
    with tqdm(total=total, desc=f"distill {run_id}", unit="task") as bar:
        for done, fut in enumerate(as_completed(futures), start=1):
            try:
                summary = fut.result()
            except Exception as exc:  # a diverged student: record it, finish the others
                if id(fut) not in names:
                    raise  # the teacher or its maps: nothing can go on without them
                failed[names[id(fut)]] = f"{type(exc).__name__}: {exc}"
                summary = {"config": names[id(fut)]}
            bar.set_postfix_str(str(summary.get("config") or summary.get("method")))
            bar.update()
            update_progress_artifact(progress, 100.0 * done / total)
    table = distill_table(run_dir, failed)
    title = (f"{spec['dataset']}: {spec.get('student', 'wrn-16-2')} from "
             f"{spec.get('teacher', 'wrn-40-2')}, final-epoch test error %")
    markdown = table_markdown(table, title)
    create_table_artifact(key=f"table4-{_key(run_id)}", table=table["rows"],
                          description=title)
    report = write_training_report(run_dir, {**spec, "title": title}, markdown)
    create_markdown_artifact(key=f"distill-{_key(run_id)}",
                             markdown=markdown + f"\n\nReport: `{report}`",
                             description="Table 4 (knowledge distillation)")
    print(markdown)
    return {"run_dir": run_dir, "table": table, "markdown": markdown, "report": str(report),
            "failed": failed}


@flow(name="finetune-voc", flow_run_name="finetune {spec[model]} on VOC ({run_id})",
      log_prints=True)
def finetune_voc(run_dir: str, run_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune an ImageNet model on VOC2007 (multi-label) and save weights for `shapcam run
    --dataset voc --models NAME:WEIGHTS`."""
    with _gpu_annotation(spec.get("device", "cpu")):
        result = finetune_t.with_options(task_run_name=f"finetune {spec['model']}").submit(
            run_dir, run_id, spec).result()
    markdown = (f"### {spec['model']} fine-tuned on VOC2007 {spec.get('train_split', 'trainval')}"
                f"\n\nmAP on {spec.get('test_split', 'test')}: {result['test_map']:.2f} % after "
                f"{result['epochs']} epochs  \nWeights: `{result['weights']}`")
    report = write_training_report(run_dir, {**spec, "title": f"{spec['model']} on VOC2007"},
                                   markdown, metric="test_map")
    create_markdown_artifact(key=f"finetune-{_key(run_id)}", markdown=markdown,
                             description="VOC2007 fine-tuning")
    print(markdown)
    return {**result, "report": str(report), "markdown": markdown}
