"""Quickstart: distill a digits classifier with the Python API, offline, on a CPU.

Run: python examples/quickstart.py   (FUNMATCH_SMOKE=1 for a seconds-long run)
"""
import math
import os

import keras

import funmatch_keras as fm

EPOCHS = 2 if os.environ.get("FUNMATCH_SMOKE") == "1" else 30
SIZE, BATCH = 16, 64
train_src, test_src = fm.sources.digits_source("train"), fm.sources.digits_source("test")
steps = fm.data.steps_per_epoch(train_src, BATCH)

# 1. A teacher trained with labels (in real use: your big fine-tuned model).
teacher = fm.models.small_cnn([32, 64, 128], num_classes=10, image_size=SIZE)
labeled = fm.data.train_pipeline(train_src, mode="consistent", batch_size=BATCH,
                                 student_size=SIZE, seed=0, with_labels=True,
                                 area_range=(0.5, 1.0), flip=False)
teacher.compile(optimizer=fm.optim.adamw(lr=1e-2, weight_decay=1e-5,
                                         total_steps=steps * EPOCHS, warmup_steps=steps),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
# shuffle=False: the pipeline shuffles (Keras warns that it ignores shuffle=True).
teacher.fit(labeled, steps_per_epoch=steps, epochs=EPOCHS, shuffle=False)

# 2. Function matching: same crop for both models, batch mixup, no labels.
student = fm.models.small_cnn([16, 32, 64], num_classes=10, image_size=SIZE)
distiller = fm.Distiller(teacher, student, temperature=1.0)
distiller.compile(optimizer=fm.optim.adamw(lr=1e-2, weight_decay=1e-5,
                                           total_steps=steps * EPOCHS, warmup_steps=steps))
train_ds = fm.data.train_pipeline(train_src, batch_size=BATCH, student_size=SIZE, seed=0,
                                  area_range=(0.25, 1.0), flip=False)
distiller.fit(train_ds, steps_per_epoch=steps, epochs=EPOCHS, shuffle=False)

# 3. Evaluate on the test split and save the student. The pipeline skips corrupt
# images, so Keras cannot know its length: `steps` says it (else Keras warns at its end).
test_ds = fm.data.eval_pipeline(test_src, size=SIZE, batch_size=256)
print(distiller.evaluate(test_ds, steps=math.ceil(test_src.num_examples / 256),
                         return_dict=True, verbose=0))
student.save("quickstart_student.keras")
